"""Weights & Biases and MLflow, through Ray's integrations (`track.wandb`, `track.mlflow`).

Each stage of a run is one tracker run, named `<run>-<stage>` and grouped by the run
directory's name: the train loops log every epoch from their rank-0 worker (Train's
`setup_wandb` / `setup_mlflow`), evolve every generation, and collect, encode and evaluate
their figures. Sweeps use Tune's `WandbLoggerCallback` and `MLflowLoggerCallback`, one
tracker run per trial. Without a W&B key, W&B runs offline with its files in
`<run>/wandb/`; `wandb sync <run>/wandb/offline-run-*` uploads them later.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def wandb_mode() -> str:
    """online with a key (WANDB_API_KEY, or `wandb login`'s netrc entry), else offline; a
    WANDB_MODE the user set wins. Ray's integrations want the mode in the environment."""
    import netrc

    mode = os.environ.get("WANDB_MODE")
    if not mode:
        try:
            logged_in = bool(netrc.netrc().authenticators("api.wandb.ai"))
        except (OSError, netrc.NetrcParseError):
            logged_in = False
        mode = "online" if os.environ.get("WANDB_API_KEY") or logged_in else "offline"
        os.environ["WANDB_MODE"] = mode
    return mode


class Tracker:
    """One stage's tracker runs; `open` gives None when no tracker is configured."""

    def __init__(self, wandb_run, mlflow):
        self.wandb_run, self.mlflow = wandb_run, mlflow

    @classmethod
    def open(cls, cfg, run_dir: Path, stage: str) -> Tracker | None:
        t = cfg.track
        if not t.wandb and not t.mlflow:
            return None
        from rayworld.config import stage_keys

        run_dir = Path(run_dir)
        name = f"{run_dir.name}-{stage}"
        keys = stage_keys(stage, cfg)  # what shaped this stage, not the whole config
        tracker = cls(None, None)
        try:
            if t.wandb:
                from ray.air.integrations.wandb import setup_wandb

                os.environ.setdefault("WANDB_SILENT", "true")
                # resume=False: Ray's default resumes the last unfinished W&B run of this
                # directory, which may be another stage's
                tracker.wandb_run = setup_wandb(
                    config=keys, project=t.wandb_project, group=run_dir.name, job_type=stage,
                    name=name, dir=str(run_dir), mode=wandb_mode(), rank_zero_only=False,
                    reinit=True, resume=False)
            if t.mlflow:
                from ray.air.integrations.mlflow import setup_mlflow

                tracker.mlflow = setup_mlflow(
                    config=keys, tracking_uri=t.mlflow, experiment_name=t.mlflow_experiment,
                    run_name=name, create_experiment_if_not_exists=True, rank_zero_only=False,
                    tags={"rayworld.run": str(run_dir), "rayworld.stage": stage})
        except Exception:
            tracker.close()  # one tracker failing to start leaves no other run open
            raise
        return tracker

    def log(self, metrics: dict, step: int):
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and
                   math.isfinite(v)}
        if self.wandb_run is not None:
            self.wandb_run.log(numbers, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("@", "_"): v for k, v in numbers.items()},
                                    step=step)

    def close(self):
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.mlflow is not None:
            self.mlflow.end_run()


def tune_callbacks(cfg, out: Path) -> list:
    """Tune's own logger callbacks for a sweep: one tracker run per trial."""
    t = cfg.track
    found = []
    if t.wandb:
        from ray.air.integrations.wandb import WandbLoggerCallback

        os.environ.setdefault("WANDB_SILENT", "true")
        found.append(WandbLoggerCallback(project=t.wandb_project, group=Path(out).name,
                                         dir=str(out), mode=wandb_mode()))
    if t.mlflow:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        found.append(MLflowLoggerCallback(tracking_uri=t.mlflow,
                                          experiment_name=t.mlflow_experiment,
                                          tags={"rayworld.sweep": str(out)}))
    return found
