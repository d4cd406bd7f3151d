"""Lightning's W&B logger with vqzoo's defaults: offline unless asked, named and grouped after
the Hydra job, and continuing the W&B run already in the run directory when a run resumes."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any, ClassVar

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

MODES = {
    "offline": "offline",
    "dryrun": "offline",
    "online": "online",
    "run": "online",
    "disabled": "disabled",
}
# W&B names its run folders `[offline-]run-<YYYYMMDD_HHMMSS>-<run id>`
RUN_FOLDER = re.compile(r"^(?:offline-)?run-\d{8}_\d{6}-(?P<id>.+)$")
MAX_NAME = 128


class WandbRunLogger(WandbLogger):
    """`WandbLogger` whose unset fields follow the Hydra job:

    - `mode`: `offline` (default: nothing leaves the machine; `wandb sync` uploads later),
      `online` or `disabled`; configs pass `${oc.env:WANDB_MODE,offline}`;
    - `id`: the W&B run already in `<save_dir>/wandb` (a resumed run continues it), else new;
    - `group`: in a multirun, the sweep directory's name, so the sweep's jobs sit together;
    - `name`: in a multirun, the job's values of the swept keys (`quantizer=vq`), else the
      run directory's name.

    A multirun's jobs share one process: a run this class started for an earlier job is
    finished before the next job's run starts, instead of being reused (and `FinishWandbRun`
    finishes each job's run when the job ends).
    """

    _started_here: ClassVar[set[str]] = (
        set()
    )  # ids of the W&B runs started by instances of this class

    def __init__(
        self,
        save_dir: str,
        mode: str = "offline",
        project: str = "vqzoo",
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        id: str | None = None,
        log_model: bool | str = False,
        **kwargs: Any,
    ) -> None:
        mode = normalize_mode(mode)
        if log_model and mode != "online":
            raise ValueError(
                f"logger.wandb.log_model={log_model} uploads checkpoints, which needs "
                f"mode=online (got {mode}); set logger.wandb.log_model=false or "
                "logger.wandb.mode=online (after `wandb login`)"
            )
        job = _hydra_job()
        run_id = id or previous_run_id(save_dir)
        if run_id:
            log.info("W&B run id %s (resumes the run of that id if there is one)", run_id)
        super().__init__(
            save_dir=save_dir,
            project=project,
            name=name or job.get("name") or Path(save_dir).name,
            group=group or job.get("group"),
            tags=list(tags or []),
            id=run_id,
            log_model=log_model,
            mode=mode,
            **kwargs,
        )
        if self._wandb_init.get("anonymous") is None:  # W&B warns about the setting itself
            self._wandb_init.pop("anonymous", None)
        self.wandb_mode = mode

    @property
    def experiment(self) -> Any:
        """The W&B run (started on first use, on rank 0; other ranks get a dummy)."""
        if self._experiment is None:
            finish_started_run()
        experiment = super().experiment
        run_id = getattr(experiment, "id", None)
        if isinstance(run_id, str):
            WandbRunLogger._started_here.add(run_id)
        return experiment

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """After a failed or preempted fit (Lightning's `finalize("failed")`), finish the W&B run
        now, as failed or preempting: a process attached to another process's W&B service
        (WANDB_SERVICE) would otherwise leave it open, and its run id taken, when it exits."""
        super().finalize(status)
        run = self._experiment
        if status == "success" or getattr(run, "id", None) not in self._started_here:
            return
        if getattr(run, "_is_finished", False):  # e.g. by `wandb.finish()` in a test
            return
        if isinstance(sys.exc_info()[1], SIGTERMException):  # called while it propagates
            run.mark_preempting()
        run.finish(exit_code=1)


def normalize_mode(mode: str | None) -> str:
    """`offline` / `online` / `disabled` from a config value or WANDB_MODE (`dryrun`, `run`
    are W&B's older spellings); anything else is an error naming the choices."""
    key = str(mode or "offline").strip().lower()
    if key not in MODES:
        raise ValueError(
            f"unknown W&B mode {mode!r}: use offline, online or disabled "
            "(logger.wandb.mode=... or the WANDB_MODE environment variable)"
        )
    return MODES[key]


def previous_run_id(save_dir: str | Path) -> str | None:
    """The id of the newest W&B run under `<save_dir>/wandb`, or None when there is none."""
    folder = Path(save_dir) / "wandb"
    if not folder.is_dir():
        return None
    runs = sorted(
        (p for p in folder.iterdir() if p.is_dir() and RUN_FOLDER.match(p.name)),
        key=lambda p: p.name.removeprefix("offline-"),  # by the timestamp in the name
    )
    return RUN_FOLDER.match(runs[-1].name)["id"] if runs else None


def _hydra_job() -> dict[str, str]:
    """Group and name for a multirun job (empty outside a Hydra multirun)."""
    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return {}
    parser = OverridesParser.create()
    job_overrides = parser.parse_overrides(list(hydra_cfg.overrides.task))
    swept = _swept_keys(hydra_cfg, parser)
    name = ",".join(o.input_line for o in job_overrides if o.get_key_element() in swept)
    name = name or hydra_cfg.job.override_dirname or f"job {hydra_cfg.job.num}"
    return {"group": Path(hydra_cfg.sweep.dir).name, "name": name[:MAX_NAME]}


def _swept_keys(hydra_cfg: DictConfig, parser: OverridesParser) -> set[str]:
    """Keys the sweep varies: the sweeper's `params` (e.g. Optuna's search space) and the
    sweeps on the multirun's command line, which Hydra's basic sweeper saves in
    `<sweep dir>/multirun.yaml`."""
    keys = {str(k) for k in (hydra_cfg.sweeper.get("params") or {})}
    saved = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    if saved.is_file():
        task = OmegaConf.load(saved).hydra.overrides.task
        keys |= {
            o.get_key_element() for o in parser.parse_overrides(list(task)) if o.is_sweep_override()
        }
    return keys


def finish_started_run() -> None:
    """Finish the global W&B run if a `WandbRunLogger` started it (else leave it alone)."""
    import wandb

    run = wandb.run
    if run is not None and run.id in WandbRunLogger._started_here:
        log.info("finishing W&B run %s", run.id)
        run.finish()


class FinishWandbRun(HydraCallback):
    """Hydra callback (configs/hydra/default.yaml): finish the job's W&B run when the job ends.

    Left to the end of the process, the run is finished by W&B's exit hook, which does not
    happen when the process only attached to another process's W&B service (W&B passes its
    address on in WANDB_SERVICE, e.g. to a train.py started from a script that uses W&B):
    the run then stays open until that service notices."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        finish_started_run()
