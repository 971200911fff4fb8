"""Progress as Ray metrics (`ray.util.metrics`): the dashboard's Metrics view and any Prometheus
scraping the nodes' metrics export port show them, with a `ray_` prefix.

    rayworld_env_steps          counter  env steps taken by collectors      tags: env
    rayworld_frames_written     counter  frames written to Parquet shards   tags: env
    rayworld_train_loss         gauge    last epoch's training loss         tags: stage
    rayworld_dream_evals_per_s  gauge    dream rollouts scored per second   tags: run
    rayworld_best_return        gauge    best return so far                 tags: run, where

Metrics are created lazily, once per process, and only where Ray is running.
"""

from __future__ import annotations

import functools

SPECS = {
    "rayworld_env_steps": ("counter", "Env steps taken by collector actors", ("env",)),
    "rayworld_frames_written": ("counter", "Frames written to Parquet shards", ("env",)),
    "rayworld_train_loss": ("gauge", "Training loss of the last epoch", ("stage",)),
    "rayworld_dream_evals_per_s": ("gauge", "Dream rollouts scored per second", ("run",)),
    "rayworld_best_return": ("gauge", "Best return so far", ("run", "where")),
}


@functools.cache
def _metric(name: str):
    from ray.util import metrics

    kind, description, tags = SPECS[name]
    cls = metrics.Counter if kind == "counter" else metrics.Gauge
    return cls(name, description=description, tag_keys=tags)


def record(name: str, value: float, **tags):
    """Add to a counter or set a gauge; a no-op without Ray, never an error for the caller."""
    import ray

    if not ray.is_initialized():
        return
    try:
        m = _metric(name)
        tags = {k: str(v) for k, v in tags.items()}
        if SPECS[name][0] == "counter":
            m.inc(float(value), tags=tags)
        else:
            m.set(float(value), tags=tags)
    except Exception as e:  # metrics must never stop a run
        print(f"rayworld: metric {name} not recorded ({e})")
