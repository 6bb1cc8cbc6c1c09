"""One job per run dir: an exclusive lock on ``<run dir>/.lock`` held by rank 0 for the
job's life, a writability check at start-up, and Hydra's own files (``.hydra/``, the log
file) written only once the lock is held, so a second job started on the same dir
changes nothing in it.

The lock is a POSIX record lock (``fcntl.lockf``): the kernel drops it when the holding
process dies, however it dies (SIGKILL, OOM killer), so a killed job never leaves a stale
lock; processes forked by the holder (loader workers) do not share it. On NFS it goes
through the lock manager (NFSv4 or lockd)."""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Optional

LOCK_FILE = ".lock"
EXIT_RUN_DIR = 2  # the run dir cannot be used (locked by another job, not writable)


class RunDirError(RuntimeError):
    """The run dir cannot be used by this job (exit 2, every rank, nothing written)."""


class RunDirLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, key: str = "hydra.run.dir") -> Optional[str]:
        """Takes the lock; None on success, else why not: who holds it (host, pid, since
        when), or that the run dir (``key``) cannot be written."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return f"{key}={str(self.path.parent)!r}: {LOCK_FILE} is a symbolic link; remove it"
            return (f"{key}={str(self.path.parent)!r}: not writable (cannot create the lock file {self.path}: "
                    f"{e.strerror}); checkpoints, metrics and status.json go there")
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                return (f"run dir {self.path.parent}: cannot lock {self.path} ({e.strerror}); the file system must "
                        "support POSIX locks (on NFS: NFSv4 or lockd)")
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)  # never locked here: closing releases nothing of the holder's
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])) if "since" in holder else "?"
            return (f"run dir {self.path.parent} is in use by another job (host {holder.get('host', '?')}, "
                    f"pid {holder.get('pid', '?')}, since {since}; lock file {self.path}): give this job its own "
                    "hydra.run.dir, or stop the other one")
        try:  # who holds it, for the message of a job that finds it taken
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, unnamed
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays (a later job reuses it)
            self._fd = None


# Files the job writes in place (or rewrites) in its run dir: a symbolic link among them
# would have the job overwrite whatever it points to.
_WRITTEN = (LOCK_FILE, ".hydra", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "pretrain.log",
            "metrics.jsonl", "status.json", "wandb_id", "data_audit")


def unwritable(run_dir: Path, key: str = "hydra.run.dir") -> Optional[str]:
    """Why the run dir or its checkpoints dir cannot be written (a byte is written to a
    probe file in each, then removed), or None. Also refuses a run dir where a file the
    job writes is a symbolic link. Called by the lock's holder only."""
    run_dir = Path(run_dir)
    for d, what in ((run_dir, f"{key}={str(run_dir)!r}"),
                    (run_dir / "checkpoints", f"the checkpoints dir {run_dir / 'checkpoints'} (under {key})")):
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=d, prefix=".write-probe-")
            try:
                os.write(fd, b"x")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as e:
            return f"{what}: not writable ({e.strerror or e}); checkpoints, metrics and status.json go there"
    audit = run_dir / "data_audit"
    names = [*_WRITTEN, *(f"data_audit/{p.name}" for p in audit.iterdir())] if audit.is_dir() and not audit.is_symlink() \
        else list(_WRITTEN)
    for name in names:
        if (run_dir / name).is_symlink():
            return (f"{key}={str(run_dir)!r}: {name} is a symbolic link (to {os.readlink(run_dir / name)}); the job "
                    "would write through it: remove it")
    return None


def write_hydra_files(run_dir: Path, task_cfg) -> None:
    """What Hydra writes before the job function (``.hydra/{config,hydra,overrides}.yaml``
    and ``<job name>.log``), done here once the run dir is ours (the root config sets
    ``hydra.output_subdir`` to null and logs to the console only)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    out = Path(run_dir) / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(task_cfg))
    (out / "hydra.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"hydra": hc})))
    (out / "overrides.yaml").write_text(OmegaConf.to_yaml(hc.overrides.task))
    handler = logging.FileHandler(Path(run_dir) / f"{hc.job.name}.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
