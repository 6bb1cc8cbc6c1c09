"""A run dir's status.json: rank 0 writes running / completed / preempted / failed, each
write atomic (a temporary file renamed over it), so readers never see half a file."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Optional

STATUS_FILE = "status.json"


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
