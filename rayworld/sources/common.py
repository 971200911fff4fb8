"""What every dataset source shares: its error, the frame size, manifest info and entries, and
waiting on its Ray conversion tasks. The sources import this, never the package above."""

from __future__ import annotations

from pathlib import Path

from rayworld.envs.frames import SIZE as OBS_SIZE  # frames are OBS_SIZE x OBS_SIZE x 3 uint8, as the envs'


class SourceError(ValueError):
    """Bad input data (a file, key, shape or value): reported in one line, also from a Ray task."""


def source_path(cfg) -> Path:
    return Path(cfg.source.path).expanduser().resolve()


def import_env_id(cfg) -> str:
    """The env_id an import of cfg.source records: env.id, else nuscenes:<version> / offline:<name>."""
    if cfg.env.id:
        return cfg.env.id
    s = cfg.source
    return f"nuscenes:{s.version}" if s.kind == "nuscenes" else f"offline:{source_path(cfg).name}"


def source_info(cfg, action_dim: int, discrete: bool, action_n: int, source: dict, **extra) -> dict:
    """The manifest info of an import: the data's spaces, `extra` keys, and
    info["source"] = {kind, absolute path, **source} (source holds the options and "episodes")."""
    return {"env_id": import_env_id(cfg), "obs_shape": [OBS_SIZE, OBS_SIZE, 3],
            "action_dim": int(action_dim), "discrete": bool(discrete),
            "action_n": int(action_n) if discrete else 0, **extra,
            "source": {"kind": cfg.source.kind, "path": str(source_path(cfg)), **source}}


def gather(refs: list, total: int, desc: str, manifest=None) -> int | list:
    """Wait for Ray tasks with a progress bar.

    A task's SourceError is raised as itself, in one line; any other error (a bug's exception
    with the task's traceback, a worker crash, OOM) propagates as Ray raises it. Either way, and
    on Ctrl-C, the tasks still pending are cancelled; shards already written stay.
    With a manifest, each ref's shard entries are recorded (and saved every few seconds) and the
    number of frames is returned; without one, the results are returned in the refs' order.
    """
    import ray

    from rayworld.actors import task_result
    from rayworld.data import ShardLog
    from rayworld.io import progress

    index = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    pending = list(refs)
    shards = ShardLog(manifest, total, desc, "frames_per_s") if manifest is not None else None
    bar = shards.bar if shards else progress(total, desc)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            result = task_result(done[0], (SourceError,))
            if shards:
                shards.add(result)
            else:
                results[index[done[0]]] = result
                bar.update(1)
    finally:
        for ref in pending:  # empty unless gather leaves early
            # force: a plain cancel is a KeyboardInterrupt, which a reused worker whose SIGINT
            # handler a library replaced never raises; shards are written atomically anyway
            ray.cancel(ref, force=True)
        if shards:
            shards.close()
        else:
            bar.close()
    return shards.steps if shards else results


def shard_entry(out_dir: Path, episode: int, steps: int, ret: float, size: int) -> dict:
    """What a conversion task returns for one written shard: a manifest entry."""
    from rayworld.data import EPISODES_DIR, shard_name

    return {"episode": episode, "file": f"{EPISODES_DIR}/{shard_name(episode)}", "steps": steps,
            "return": float(ret), "bytes": size}
