"""Datasets that become rollout shards: the collect stage for sources other than an env.

`import_source(cfg, run_dir, log)` converts `cfg.source` into run_dir/data exactly as
`rayworld collect` would have written it (one Parquet shard per episode, a manifest), so every
later stage runs unchanged. The driver only reads the dataset's index (tables, headers, episode
bounds); Ray tasks decode, resize and write the frames.

A re-run verifies the shards already written and converts only the missing episodes. The
manifest records the source (kind, absolute path, options and the episode names in order), and a
run directory that holds another source's data is refused. Bad input raises SourceError, shown in
one line whether the driver or a Ray task found it.
"""

from __future__ import annotations

import time
from pathlib import Path

from rayworld.sources.common import (  # noqa: F401  (the sources' shared names, re-exported)
    OBS_SIZE,
    SourceError,
    gather,
    import_env_id,
    shard_entry,
    source_info,
    source_path,
)


def import_complete(cfg, manifest) -> bool:
    """Whether `manifest` (run_dir/data) holds a finished import of exactly what `cfg` asks for.

    True only if the import finished (info["complete"]), the recorded source matches every
    cfg.source key it records (path compared after expanduser().resolve()), and the recorded
    env_id is the one this config would record (`import_env_id`). Otherwise collect must run:
    it converts what is missing, or refuses another dataset / env.id in one line.
    """
    info = manifest.info
    src = info.get("source") or {}
    if not info.get("complete") or src.get("kind") != cfg.source.kind:
        return False
    asked = {**vars(cfg.source), "path": str(source_path(cfg))}
    return all(src[k] == v for k, v in asked.items() if k in src) and \
        info.get("env_id") == import_env_id(cfg)


def import_source(cfg, run_dir: Path, log=print) -> dict:
    kind = cfg.source.kind
    if kind == "nuscenes":
        from rayworld.sources.nuscenes import prepare
    elif kind == "offline":
        from rayworld.sources.offline import prepare
    else:
        raise SourceError(f"source.kind {kind!r}: expected 'nuscenes' or 'offline' here")
    info, submit = prepare(cfg, log)
    if cfg.env.id:  # evolve and evaluate will play this env: it must take the data's actions
        _check_env_matches(cfg, info)
    return run_import(cfg, Path(run_dir), info, submit, log)


def _check_env_matches(cfg, info: dict):
    from rayworld.data import env_info

    env = env_info(cfg)
    for key in ("obs_shape", "action_dim", "discrete", "action_n"):
        if env[key] != info[key]:
            raise SourceError(f"config key 'env.id': {cfg.env.id} has {key} {env[key]!r}, the "
                              f"{cfg.source.kind} data at {cfg.source.path} has {info[key]!r}; "
                              "set env.id to the env the data came from, or '' for none")


def run_import(cfg, run_dir: Path, info: dict, submit, log=print) -> dict:
    """Write the episodes that `submit` converts into run_dir/data; returns collect's figures.

    `info` is the manifest's info; info["source"]["episodes"] names the episodes in order (the
    index is the episode number). `submit(todo, out_dir)` starts Ray tasks for the episode
    numbers in `todo` and returns their refs, each resolving to a list of shard entries.
    """
    from rayworld.data import EPISODES_DIR, Manifest, check_shards, figures

    start = time.perf_counter()
    data_dir = run_dir / "data"
    manifest = Manifest.load_or_new(data_dir, {**info, "complete": False})
    _refuse_other_source(manifest, info)
    check_shards(manifest, log)
    todo = [e for e in range(len(info["source"]["episodes"])) if e not in manifest.shards]
    manifest.info = {**info, "complete": not todo}
    manifest.save()  # the source is on record before any shard is written
    frames_new = 0
    if todo:
        refs = submit(todo, data_dir / EPISODES_DIR)
        frames_new = gather(refs, len(todo), f"import {cfg.source.kind}", manifest)
    manifest.info["complete"] = True
    manifest.save()
    wall = time.perf_counter() - start
    stats = figures(manifest, len(todo), frames_new, wall, None)  # no env steps: a conversion
    log(f"import {cfg.source.kind}: {stats['episodes']} episodes, {stats['frames_collected']} "
        f"frames" + (f", {frames_new / wall:.0f} frames/s converted" if todo else " (nothing new)"))
    return stats


def _refuse_other_source(manifest, info: dict):
    old, new = manifest.info.get("source"), info["source"]
    if old is None:
        raise SourceError(f"{manifest.path}: holds rollouts of env {manifest.info.get('env_id')}, "
                          f"config asks for a {new['kind']} import; use another --out")
    if old.get("kind") != new["kind"]:
        raise SourceError(f"{manifest.path}: holds an import of {old.get('path')} (source.kind "
                          f"{old.get('kind')!r}), config asks for source.kind {new['kind']!r}; "
                          "use another --out")
    for key in sorted(set(old) | set(new)):
        if key != "episodes" and old.get(key) != new.get(key):
            raise SourceError(f"{manifest.path}: holds a {old.get('kind')} import with source.{key} "
                              f"{old.get(key)!r}, config asks for {new.get(key)!r}; use another --out")
    if old.get("episodes") != new["episodes"]:
        raise SourceError(f"{manifest.path}: the dataset at {new['path']} changed since it was "
                          f"imported ({len(old.get('episodes') or [])} episodes then, "
                          f"{len(new['episodes'])} now); use another --out")
    if manifest.info.get("env_id") != info["env_id"]:
        raise SourceError(f"{manifest.path}: holds an import recorded as env_id "
                          f"{manifest.info.get('env_id')!r}, config asks for {info['env_id']!r} "
                          "(env.id, or the dataset's name when it is ''); use another --out")
    for key in ("obs_shape", "action_dim", "discrete", "action_n"):
        if manifest.info.get(key) != info[key]:
            raise SourceError(f"{manifest.path}: data has {key} {manifest.info.get(key)!r}, the "
                              f"source now gives {info[key]!r}; use another --out")
