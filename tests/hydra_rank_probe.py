"""A Hydra app on the project's train config that only logs one line: what one rank of a
torchrun / SLURM launch writes into the run directory before training starts.

`python tests/hydra_rank_probe.py hydra.run.dir=<dir> [overrides]`; the launcher's variables
(RANK, LOCAL_RANK, SLURM_PROCID, ...) come from the environment.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from src.utils.run_name import register_resolvers

register_resolvers()
log = logging.getLogger("rank_probe")
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train.yaml")
def main(cfg: DictConfig) -> None:
    launch = {k: v for k, v in sorted(os.environ.items()) if "RANK" in k or k == "SLURM_PROCID"}
    log.info("probe ran with %s", launch)


if __name__ == "__main__":
    main()
