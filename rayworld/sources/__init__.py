"""Datasets that become rollout shards: the collect stage for sources other than an env.

`import_source(cfg, run_dir, log)` converts `cfg.source` into run_dir/data exactly as
`rayworld collect` would have written it (one Parquet shard per episode, a manifest), so every
later stage runs unchanged.
"""

from __future__ import annotations

from pathlib import Path


def import_source(cfg, run_dir: Path, log=print) -> dict:
    raise NotImplementedError(f"source.kind {cfg.source.kind!r} is not implemented yet")
