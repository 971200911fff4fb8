"""Datasets that become rollout shards: the collect stage for sources other than an env.

`import_source(cfg, run_dir, log)` converts `cfg.source` into run_dir/data exactly as
`rayworld collect` would have written it (one Parquet shard per episode, a manifest), so every
later stage runs unchanged. The driver only reads the dataset's index (tables, headers, episode
bounds); Ray tasks decode, resize and write the frames.

A re-run verifies the shards already written and converts only the missing episodes. The
manifest records the source (kind, absolute path, options and the episode names in order), and a
run directory that holds another source's data is refused.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

OBS_SIZE = 64  # frames are stored as OBS_SIZE x OBS_SIZE x 3 uint8, like the envs' observations


def resize_frame(img, size: int = OBS_SIZE) -> np.ndarray:
    """A PIL image -> uint8 [size, size, 3]: the whole frame, box-filtered (no crop).

    The box filter averages every source pixel into the one it lands in, the right filter for
    large downscales; a non-square frame is squashed, so all of the field of view is kept.
    """
    from PIL import Image

    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, np.uint8)


def import_source(cfg, run_dir: Path, log=print) -> dict:
    kind = cfg.source.kind
    if kind == "nuscenes":
        from rayworld.sources.nuscenes import prepare
    elif kind == "offline":
        from rayworld.sources.offline import prepare
    else:
        raise ValueError(f"source.kind {kind!r}: expected 'nuscenes' or 'offline' here")
    info, submit = prepare(cfg, log)
    if cfg.env.id:  # evolve and evaluate will play this env: it must take the data's actions
        _check_env_matches(cfg, info)
    return run_import(cfg, Path(run_dir), info, submit, log)


def _check_env_matches(cfg, info: dict):
    from rayworld.collect import env_info

    env = env_info(cfg)
    for key in ("obs_shape", "action_dim", "discrete", "action_n"):
        if env[key] != info[key]:
            raise ValueError(f"config key 'env.id': {cfg.env.id} has {key} {env[key]!r}, the "
                             f"{cfg.source.kind} data at {cfg.source.path} has {info[key]!r}; "
                             "set env.id to the env the data came from, or '' for none")


def run_import(cfg, run_dir: Path, info: dict, submit, log=print) -> dict:
    """Write the episodes that `submit` converts into run_dir/data; returns collect's figures.

    `info` is the manifest's info; info["source"]["episodes"] names the episodes in order (the
    index is the episode number). `submit(todo, out_dir)` starts Ray tasks for the episode
    numbers in `todo` and returns their refs, each resolving to a list of shard entries.
    """
    from rayworld.collect import EPISODES_DIR, check_shards
    from rayworld.data import Manifest

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
    stats = {
        "episodes": len(manifest.shards), "frames_collected": manifest.frames,
        "episodes_new": len(todo), "env_steps_new": frames_new, "env_steps_per_s": None,
        "return_mean": float(np.mean([s["return"] for s in manifest.shards.values()])),
        "wall_s": wall,
    }
    log(f"import {cfg.source.kind}: {stats['episodes']} episodes, {stats['frames_collected']} "
        f"frames" + (f", {frames_new / wall:.0f} frames/s converted" if todo else " (nothing new)"))
    return stats


def _refuse_other_source(manifest, info: dict):
    old, new = manifest.info.get("source"), info["source"]
    if old is None:
        raise ValueError(f"{manifest.path}: holds rollouts of env {manifest.info.get('env_id')}, "
                         f"config asks for a {new['kind']} import; use another --out")
    if old.get("kind") != new["kind"]:
        raise ValueError(f"{manifest.path}: holds an import of {old.get('path')} (source.kind "
                         f"{old.get('kind')!r}), config asks for source.kind {new['kind']!r}; "
                         "use another --out")
    for key in sorted(set(old) | set(new)):
        if key != "episodes" and old.get(key) != new.get(key):
            raise ValueError(f"{manifest.path}: holds a {old.get('kind')} import with source.{key} "
                             f"{old.get(key)!r}, config asks for {new.get(key)!r}; use another --out")
    if old.get("episodes") != new["episodes"]:
        raise ValueError(f"{manifest.path}: the dataset at {new['path']} changed since it was "
                         f"imported ({len(old.get('episodes') or [])} episodes then, "
                         f"{len(new['episodes'])} now); use another --out")
    for key in ("obs_shape", "action_dim", "discrete", "action_n"):
        if manifest.info.get(key) != info[key]:
            raise ValueError(f"{manifest.path}: data has {key} {manifest.info.get(key)!r}, the "
                             f"source now gives {info[key]!r}; use another --out")


def gather(refs: list, total: int, desc: str, manifest=None) -> int | list:
    """Wait for Ray tasks with a progress bar; a task's error is raised as itself, in one line.

    With a manifest, each ref's shard entries are recorded (and saved every few seconds) and the
    number of frames is returned; without one, the results are returned in the refs' order.
    """
    import ray
    from ray.exceptions import RayTaskError

    from rayworld.io import progress

    index = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    pending, frames = list(refs), 0
    bar = progress(total, desc)
    last_save = t0 = time.perf_counter()
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                result = ray.get(done[0])
            except RayTaskError as e:
                for ref in pending:  # stop the rest; shards already written stay
                    ray.cancel(ref)
                cause = getattr(e, "cause", None)
                raise (cause if isinstance(cause, Exception) else e) from None
            if manifest is None:
                results[index[done[0]]] = result
                bar.update(1)
                continue
            for entry in result:
                manifest.shards[entry.pop("episode")] = entry
                frames += entry["steps"]
            bar.update(len(result))
            bar.set_postfix(frames_per_s=f"{frames / (time.perf_counter() - t0):.0f}", refresh=False)
            if time.perf_counter() - last_save > 5:  # a crash loses at most 5 s of listing
                manifest.save()
                last_save = time.perf_counter()
    finally:
        bar.close()
        if manifest is not None:
            manifest.save()
    return results if manifest is None else frames


def shard_entry(out_dir: Path, episode: int, steps: int, ret: float, size: int) -> dict:
    """What a conversion task returns for one written shard: a manifest entry."""
    from rayworld.collect import EPISODES_DIR
    from rayworld.data import shard_name

    return {"episode": episode, "file": f"{EPISODES_DIR}/{shard_name(episode)}", "steps": steps,
            "return": float(ret), "bytes": size}
