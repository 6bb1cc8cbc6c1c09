"""``python -m pretrain [overrides]``: compose the Hydra config, validate it, train.

Works as one process, under torchrun, and as srun tasks. Only rank 0 owns Hydra's run
dir; other ranks learn it from rank 0 once the process group is up."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from parallel.env import detect_launch_env

from .config import JobConfig, register_configs
from .validate import ConfigError, validate_job

log = logging.getLogger("pretrain")
EXIT_CONFIG_ERROR = 2
EXIT_CHECKPOINT_ERROR = 4


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def hydra_main(dcfg: DictConfig) -> None:
    env = detect_launch_env()
    cfg: JobConfig = OmegaConf.to_object(dcfg)
    try:
        dims = validate_job(cfg, env.world_size)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    logging.getLogger("pretrain").setLevel(logging.INFO)
    run_dir = Path(HydraConfig.get().runtime.output_dir)

    from .checkpoint import CheckpointError
    from .train import EXIT_PREEMPTED, Preempted, train

    try:
        train(cfg, env, dims, run_dir)
    except Preempted:
        sys.exit(EXIT_PREEMPTED)
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        sys.exit(EXIT_CHECKPOINT_ERROR)


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
