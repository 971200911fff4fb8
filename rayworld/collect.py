"""Stage 1, collect: Ray actors run episodes in headless envs and write one Parquet shard each.

Episode i always uses env seed `collect.seed + i`, the same policy seed and the same policy
(`episode_policy`), so a re-run that redoes an episode reproduces it. A re-run into the same
run directory checks every shard, replaces corrupt ones, and collects only the missing
episodes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray

from rayworld.actors import close_and_kill, keep_busy, task_result
from rayworld.config import Config
from rayworld.data import (
    EPISODES_DIR,
    Manifest,
    ShardError,
    ShardLog,
    check_shards,
    env_info,
    figures,
    shard_name,
    write_episode,
)
from rayworld.policies import (
    MODEL_KINDS,
    make_policy,
    model_policy,
    require_world_model,
    run_episode,
)

# ---------------------------------------------------------------- the actor

class Collector:
    """Owns one env; runs whole episodes and writes each as one shard.

    `worker_index` is the actor's place in the pool (envs that need a server each, like CARLA,
    use it to pick theirs). When the env's simulator server fails (SimulatorError), the env is
    closed and built again (a new connection) and the episode redone from its start, at most
    `env_retries` more times. A shard is only ever written for a whole episode.
    """

    def __init__(self, env_id: str, env_kwargs: dict, out_dir: str, policy: str, sigma: float,
                 compression: str, cfg_dict: dict | None = None, worker_index: int = 0,
                 env_retries: int = 0):
        self.env_id, self.env_kwargs, self.worker_index = env_id, dict(env_kwargs), worker_index
        self.env_retries = env_retries
        self.env = self._make_env()  # built now, so a bad kwarg fails before any episode
        self.out_dir = Path(out_dir)
        self.policy, self.sigma, self.compression = policy, sigma, compression
        self.gas, self.agent, self.lapses = 0.7, None, (0.002, 0.0)
        if cfg_dict is not None:
            from rayworld.config import load_config

            cfg = load_config(base=cfg_dict)
            self.gas = cfg.collect.gas
            self.lapses = (cfg.collect.lapses, cfg.collect.straight_lapses)
            if policy in MODEL_KINDS:  # acts through the world model (iterative training)
                import torch

                torch.set_num_threads(1)
                self.agent = model_policy(policy, self.out_dir.parent.parent, cfg,
                                          cfg.collect.noise)

    def _make_env(self):
        from rayworld.envs import make_env

        return make_env(self.env_id, worker_index=self.worker_index, **self.env_kwargs)

    def close(self):
        if self.env is not None:
            env, self.env = self.env, None
            env.close()

    def _episode(self, seed: int, max_steps: int, kind: str):
        if self.env is None:
            self.env = self._make_env()
        if self.agent is not None and kind == self.policy:
            self.agent.reseed(seed)
            self.agent.reset()
            policy = self.agent
        else:
            policy = make_policy(kind, self.env.action_space, seed, self.sigma, self.gas,
                                 *self.lapses)
        return run_episode(self.env, policy, seed, max_steps)

    def run(self, episode: int, seed: int, max_steps: int, kind: str | None = None) -> dict:
        from rayworld.envs.registry import SimulatorError

        start = time.perf_counter()
        for attempt in range(self.env_retries + 1):
            try:
                obs, actions, rewards, terms, truncs = self._episode(seed, max_steps,
                                                                     kind or self.policy)
                break
            except SimulatorError as e:
                self.close()  # the next try connects afresh and starts the episode over
                if attempt == self.env_retries:
                    raise SimulatorError(
                        f"collector {self.worker_index}, episode {episode}: {e} (tried "
                        f"{attempt + 1} times; collect.env_retries={self.env_retries})") from None
        name = shard_name(episode)
        size = write_episode(self.out_dir / name, episode, obs, actions, rewards, terms, truncs,
                             meta={"env_id": self.env_id, "episode": episode, "seed": seed,
                                   "policy": kind or self.policy},
                             compression=self.compression)
        from rayworld.telemetry import record

        record("rayworld_env_steps", len(actions), env=self.env_id)
        record("rayworld_frames_written", len(obs), env=self.env_id)
        return {"episode": episode, "file": f"{EPISODES_DIR}/{name}", "steps": len(obs),
                "return": float(rewards.sum()), "bytes": size,
                "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------- the driver

def episode_policy(c, episode: int) -> str:
    """Episode i's policy: one of `collect.mix` with its share's chance, else `collect.policy`.

    Drawn from the episode's own seed, so it never depends on which episodes exist already.
    """
    u = np.random.default_rng([c.seed + episode, 3]).random()
    for kind, share in sorted(c.mix.items()):
        if u < share:
            return kind
        u -= share
    return c.policy


def collect(cfg: Config, run_dir: Path, log=print) -> dict:
    """Collect `cfg.collect.episodes` episodes into run_dir/data; returns the stage's figures.

    Only missing episodes are collected, with `cfg.collect.policy` (iterative training sets it
    to "controller" for the episodes it adds). A dataset source is imported instead, by
    `rayworld.pipeline.collect_stage`.
    """
    start = time.perf_counter()
    data_dir = Path(run_dir) / "data"
    info = env_info(cfg)
    manifest = Manifest.load_or_new(data_dir, info)
    if manifest.info.get("env_id") != info["env_id"] or \
            manifest.info.get("obs_shape") != info["obs_shape"]:
        raise ShardError(f"{manifest.path}: data was collected from {manifest.info.get('env_id')} "
                         f"{manifest.info.get('obs_shape')}, config asks for {info['env_id']} "
                         f"{info['obs_shape']}; use another --out")
    check_shards(manifest, log)
    if cfg.collect.policy in MODEL_KINDS:
        require_world_model(cfg.collect.policy, run_dir, cfg)
    todo = [e for e in range(cfg.collect.episodes) if e not in manifest.shards]
    c = cfg.collect
    new_steps = 0
    if todo:
        n_actors = c.num_actors or max(1, int(ray.available_resources().get("CPU", 1)))
        n_actors = min(n_actors, len(todo))
        _check_last_actor_env(cfg, n_actors)
        actor_cls = ray.remote(num_cpus=1, max_restarts=10, max_task_retries=10)(Collector)
        actors = [actor_cls.options(name=f"collector-{i}", scheduling_strategy="SPREAD",
                                    resources=c.actor_resources or None).remote(
            cfg.env.id, cfg.env.kwargs, str(data_dir / EPISODES_DIR), c.policy,
            c.brownian_sigma, cfg.data.compression, cfg.to_dict(), worker_index=i,
            env_retries=c.env_retries) for i in range(n_actors)]
        try:
            new_steps = _dispatch(actors, todo, manifest, c, log)
        finally:
            close_and_kill(actors)
    manifest.save()
    wall = time.perf_counter() - start
    stats = figures(manifest, len(todo), new_steps, wall, new_steps / wall if todo else None)
    log(f"collect: {stats['episodes']} episodes, {stats['frames_collected']} frames"
        + (f", {stats['env_steps_per_s']:.0f} env steps/s" if todo else " (nothing new)"))
    return stats


def _check_last_actor_env(cfg: Config, n_actors: int):
    """Envs with a server per actor: fail here, in one line, if the last actor has no server."""
    from rayworld.envs import make_env
    from rayworld.envs.registry import spec

    if n_actors > 1 and spec(cfg.env.id).takes_worker_index:
        make_env(cfg.env.id, worker_index=n_actors - 1, **cfg.env.kwargs).close()


def _dispatch(actors, todo: list[int], manifest: Manifest, c, log) -> int:
    """Keep two episodes queued per actor; record each finished shard in the manifest."""
    from rayworld.envs.registry import EnvArgumentError, SimulatorError

    shards = ShardLog(manifest, len(todo), "collect", "steps_per_s")
    try:
        for _, ref in keep_busy(actors, todo, lambda a, e: _run(a, e, c), depth=2):
            result = task_result(ref, (SimulatorError, EnvArgumentError))
            result.pop("seconds")
            shards.add([result])
    finally:
        shards.close()
    return shards.steps


def _run(actor, episode: int, c):
    return actor.run.remote(episode, c.seed + episode, c.max_steps, episode_policy(c, episode))
