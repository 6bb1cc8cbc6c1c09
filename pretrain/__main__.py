"""``python -m pretrain [overrides]``: compose the Hydra config, validate it, train.

Works as one process, under torchrun, and as srun tasks. Only rank 0 owns Hydra's run
dir and its status.json (running, then completed / preempted / failed with the exit
code); other ranks learn the dir from rank 0 once the process group is up."""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from data_pipeline.sources import DataError
from parallel.env import detect_launch_env

from .checkpoint.files import CheckpointError
from .config import JobConfig, register_configs
from .runtime.rundir import EXIT_RUN_DIR, RunDirError, RunDirLock, unwritable, write_hydra_files
from .runtime.signals import EXIT_PREEMPTED, Interrupted, Preempted, SignalHandler, die_with_parent
from .runtime.status import EXIT_DIVERGED, Diverged, diverged_before, write_status
from .validate import ConfigError, validate_job

log = logging.getLogger("pretrain")
EXIT_CONFIG_ERROR = 2
EXIT_CHECKPOINT_ERROR = 4


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def hydra_main(dcfg: DictConfig) -> None:
    env = detect_launch_env()
    cfg: JobConfig = OmegaConf.to_object(dcfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    info = {"started": time.time(), "world_size": env.world_size}
    if os.environ.get("SLURM_JOB_ID"):  # which SLURM attempt wrote the status (the batch scripts requeue by it)
        info["slurm_attempt"] = f"{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    # From main() on (or here, in a launcher's job process) a signal ends the job cleanly.
    # main()'s handler for the first job of this process, then a fresh one (a launcher's job
    # process, which unpickled this module's globals, has its own pid).
    signals = _SIGNALS.pop(os.getpid(), None) or SignalHandler()
    lock = RunDirLock(run_dir) if env.rank == 0 else None

    def status(state: str, exit_code=None, **fields) -> None:
        # Rank 0 only, and only while it holds the run dir: ranks > 0 run with
        # hydra.run.dir=. and another job may own the dir.
        if lock is None or not lock.held:
            return
        if exit_code is not None:
            fields = {"exit_code": exit_code, **fields, "ended": time.time()}
        try:
            write_status(run_dir, status=state, **info, **fields)
        except OSError as e:
            log.warning("could not write %s/status.json: %s", run_dir, e)

    signals.report = status
    again = None  # torchrun's restart of an attempt that diverged: its status.json stays as it is
    try:
        problem, again = _claim_run_dir(lock, run_dir, dcfg) if lock else (None, None)
        try:
            dims = validate_job(cfg, env.world_size)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            status("failed", EXIT_CONFIG_ERROR, step=None, error=f"ConfigError: {e}")
            sys.exit(EXIT_CONFIG_ERROR)
        logging.getLogger("pretrain").setLevel(logging.INFO)
        from .train import train

        if again is None:
            status("running")
        train(cfg, env, dims, run_dir, signals=signals, run_dir_problem=problem, report=status,
              diverged=again)
        status("completed", 0, step=cfg.train.steps)
    except Preempted as e:
        signals.exiting = True
        status("preempted", EXIT_PREEMPTED, step=e.step, signal=e.signal)
        sys.exit(EXIT_PREEMPTED)
    except Diverged as e:
        signals.exiting = True
        print(f"diverged: {e}", file=sys.stderr)
        if again is None:
            status("diverged", EXIT_DIVERGED, step=e.step, error=f"Diverged: {e}")
        sys.exit(EXIT_DIVERGED)
    except RunDirError as e:
        print(f"run dir error: {e}", file=sys.stderr)
        sys.exit(EXIT_RUN_DIR)
    except DataError as e:  # a corpus or config problem, named: one line, not a traceback
        signals.exiting = True
        print(f"data error: DataError: {e}", file=sys.stderr)
        status("failed", 1, step=None, error=f"DataError: {e}")
        sys.exit(1)
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        status("failed", EXIT_CHECKPOINT_ERROR, step=None, error=f"{type(e).__name__}: {e}")
        sys.exit(EXIT_CHECKPOINT_ERROR)
    except Interrupted as e:
        signals.exiting = True
        print(f"stopped: {e}", file=sys.stderr)
        status("failed", e.exit_code, step=None, error=f"Interrupted: {e}")
        sys.exit(e.exit_code)
    except BaseException as e:
        signals.exiting = True
        if not isinstance(e, SystemExit):
            status("failed", 130 if isinstance(e, KeyboardInterrupt) else 1, step=None,
                   error=f"{type(e).__name__}: {e}")
        raise
    finally:
        signals.restore()
        if lock is not None:
            lock.release()


def _claim_run_dir(lock: RunDirLock, run_dir: Path, dcfg: DictConfig):
    """Rank 0 owns the run dir: it takes its lock and checks it can write there before
    writing anything (Hydra's files included); every rank learns the outcome once the
    process group is up and stops together (exit 2) when it cannot be used. Returns (why
    the run dir cannot be used, why this torchrun restart must not resume: exit 5 is
    final, also under --max-restarts, which restarts after any exit), each None if not."""
    key = "hydra.sweep.dir" if _multirun() else "hydra.run.dir"
    problem = lock.acquire(key) or unwritable(run_dir, key)
    if problem is None:
        try:
            write_hydra_files(run_dir, dcfg)
        except OSError as e:
            problem = f"{key}={str(run_dir)!r}: cannot write {e.filename or '.hydra/'} ({e.strerror})"
    return problem, diverged_before(run_dir) if problem is None else None


def _multirun() -> bool:
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


_SIGNALS: dict = {}  # pid -> the SignalHandler main() installed before Hydra composes


def main() -> None:
    die_with_parent()  # under torchrun: no orphan outlives a killed agent
    _SIGNALS[os.getpid()] = SignalHandler()
    try:
        _main()
    except Interrupted as e:  # before the run dir was known: nothing to write there
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def _main() -> None:
    register_configs()
    env = detect_launch_env()
    multirun = any(a in ("-m", "--multirun") for a in sys.argv[1:])
    if env.rank != 0 and not multirun:
        # Ranks > 0 write nothing through Hydra (no .hydra/, no log file, no second
        # timestamped dir); the trainer broadcasts rank 0's run dir to them.
        sys.argv += ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=stdout",
                     "hydra/hydra_logging=none"]
    hydra_main()


def exit_now(code) -> None:
    """Ends the process as ``sys.exit(code)`` would, minus the interpreter's teardown of
    torch's modules (about 1 s of every process's exit on CPU, each torchrun worker's
    too): threads are shut down as at interpreter exit, atexit handlers run (logging's
    flush and close among them), stdio is flushed, then ``os._exit``."""
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed, exit 1
        print(code, file=sys.stderr)
        code = 1
    # What interpreter exit does first: threading's exit hooks (idle executor threads of an
    # async checkpoint are woken) and the join of every non-daemon thread.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        exit_now(e.code)
    exit_now(0)
