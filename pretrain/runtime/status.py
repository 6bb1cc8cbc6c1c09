"""A run dir's status.json: rank 0 writes running / completed / preempted / diverged /
failed, each write atomic (a temporary file renamed over it), so readers never see half a file."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Optional

STATUS_FILE = "status.json"
EXIT_DIVERGED = 5  # a non-finite loss, gradient norm or weight: stopped before any checkpoint of it


class Diverged(Exception):
    """Training produced a non-finite value: the run stops (exit 5, status ``diverged``)
    before writing a checkpoint of it; the newest checkpoint is the last good one. Rerunning
    the same command would diverge again: change the config (learning rate, warm-up,
    clipping) first."""

    def __init__(self, step: Optional[int], what, root=None, kept=(), message: Optional[str] = None):
        self.step, self.what = step, list(what)
        where = (f"kept in {root}: {', '.join(kept)}, each of finite values; a divergence can pass through finite "
                 "values first: move aside those whose loss is already off, and resume from the newest good one"
                 if kept else "no checkpoint yet")
        super().__init__(message or f"training diverged at step {step}: {' and '.join(self.what)} not finite; "
                         f"stopped before saving it ({where}). Lower optim.lr, raise optim.warmup_steps or set "
                         "train.max_norm, then run the same command to resume")


def diverged_before(run_dir) -> Optional[str]:
    """torchrun restarted the workers (``TORCHELASTIC_RESTART_COUNT`` > 0, ``--max-restarts``
    restarts after any exit) after a previous attempt of this run diverged: its status.json
    still says so (every attempt 0 writes ``running`` first). Resuming would diverge again at
    the same step (the run repeats itself): the reason to end the restart at once (exit 5),
    else None."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) <= 0:
        return None
    prior = read_status(run_dir) or {}
    if prior.get("status") != "diverged":
        return None
    return (f"the previous attempt of this torchrun run diverged (at step {prior.get('step')}): not resuming it, "
            "it would diverge again; change the config (optim.lr, optim.warmup_steps, train.max_norm) and start "
            "the job again")


def write_status(run_dir, **fields) -> None:
    """Replaces <run_dir>/status.json with `fields` as one JSON object. On a full disk,
    where the temporary file cannot be written, the file is rewritten in place instead
    (truncating it frees the space the new text needs): a reader may then see it empty
    for a moment, but the final status is not lost."""
    run_dir = Path(run_dir)
    text = json.dumps(fields, indent=1) + "\n"
    tmp = run_dir / f".{STATUS_FILE}.{os.getpid()}.tmp"  # same dir: the rename stays atomic
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, run_dir / STATUS_FILE)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not (run_dir / STATUS_FILE).is_file():
            raise
        fd = os.open(run_dir / STATUS_FILE, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_status(run_dir) -> Optional[dict]:
    """The run's status, or None when it has none (older or killed runs) or it is unreadable."""
    try:
        data = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
