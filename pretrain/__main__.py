"""``python -m pretrain [overrides]``: compose the Hydra config, validate it, train.

Works as one process, under torchrun, and as srun tasks. Only rank 0 owns Hydra's run
dir and its status.json (running, then completed / preempted / failed with the exit
code); other ranks learn the dir from rank 0 once the process group is up."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from parallel.env import detect_launch_env

from .config import JobConfig, register_configs
from .status import write_status
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

    def status(state: str, exit_code=None, **fields) -> None:
        # Rank 0 only: ranks > 0 run with hydra.run.dir=. and must not write there.
        if env.rank != 0:
            return
        if exit_code is not None:
            fields = {"exit_code": exit_code, **fields, "ended": time.time()}
        try:
            write_status(run_dir, status=state, **info, **fields)
        except OSError as e:
            log.warning("could not write %s/status.json: %s", run_dir, e)

    try:
        dims = validate_job(cfg, env.world_size)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        status("failed", EXIT_CONFIG_ERROR, step=None, error=f"ConfigError: {e}")
        sys.exit(EXIT_CONFIG_ERROR)
    logging.getLogger("pretrain").setLevel(logging.INFO)

    from .checkpoint import CheckpointError
    from .train import EXIT_PREEMPTED, Preempted, train

    status("running")
    try:
        train(cfg, env, dims, run_dir)
    except Preempted as e:
        status("preempted", EXIT_PREEMPTED, step=e.step)
        sys.exit(EXIT_PREEMPTED)
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        status("failed", EXIT_CHECKPOINT_ERROR, step=None, error=f"{type(e).__name__}: {e}")
        sys.exit(EXIT_CHECKPOINT_ERROR)
    except BaseException as e:
        if not isinstance(e, SystemExit):
            status("failed", 130 if isinstance(e, KeyboardInterrupt) else 1, step=None,
                   error=f"{type(e).__name__}: {e}")
        raise
    status("completed", 0, step=cfg.train.steps)


def main() -> None:
    register_configs()
    env = detect_launch_env()
    multirun = any(a in ("-m", "--multirun") for a in sys.argv[1:])
    if env.rank != 0 and not multirun:
        # Ranks > 0 write nothing through Hydra (no .hydra/, no log file, no second
        # timestamped dir); the trainer broadcasts rank 0's run dir to them.
        sys.argv += ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=stdout",
                     "hydra/hydra_logging=none"]
    hydra_main()


if __name__ == "__main__":
    main()
