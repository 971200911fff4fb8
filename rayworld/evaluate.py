"""Stage 7, evaluate: a controller in the real env, next to the random policy on the same seeds.

A real rollout runs the whole World Models agent: the VAE encodes each frame to z, the
controller acts on [z, h], and the MDN-RNN advances h with (z, action).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray
import torch

from rayworld.actors import close_and_kill, keep_busy
from rayworld.config import Config
from rayworld.io import progress
from rayworld.policies import (
    Agent,
    RandomPolicy,
    check_world_model,
    load_controller_params,
    run_episode,
)


class RealRunner:
    """Owns one real env and an Agent; runs whole episodes.

    `worker_index`: the runner's place in its pool; an env with a server per actor (CARLA) uses it.
    The env is built on first use, so a runner that only dreams never connects to a server.
    """

    def __init__(self, run_dir: str, cfg_dict: dict, worker_index: int = 0):
        from rayworld.config import load_config

        torch.set_num_threads(1)
        self.cfg = load_config(base=cfg_dict)
        self.agent = Agent(run_dir, self.cfg, z_sample=self.cfg.controller.z == "sample")
        self.world, self.controller = self.agent.world, self.agent.controller
        self.worker_index, self._env = worker_index, None

    @property
    def env(self):
        if self._env is None:
            from rayworld.envs import make_env

            self._env = make_env(self.cfg.env.id, worker_index=self.worker_index,
                                 **{**self.cfg.env.kwargs, **self.cfg.evaluate.env_kwargs})
        return self._env

    def close(self):
        if self._env is not None:
            env, self._env = self._env, None
            env.close()

    def episode(self, params, seed: int, max_steps: int) -> float:
        """Total real reward of one episode.

        params: the controller's flat parameters, a policy callable on (z, h) (see Agent), or
        None for the uniform random policy.
        """
        if params is None:
            policy = RandomPolicy(self.env.action_space, np.random.default_rng([seed, 11]))
        else:
            if callable(params):
                self.agent.set_policy(params)
            else:
                self.agent.set_params(params)
            self.agent.reseed(seed)  # the agent's own noise (z samples) follows the episode
            self.agent.reset()
            policy = self.agent
        return float(run_episode(self.env, policy, seed, max_steps)[2].sum())


def runner_pool(run_dir: Path, cfg: Config, n: int, name: str = "real-evaluator"):
    cls = ray.remote(num_cpus=1, max_restarts=3, max_task_retries=3)(RealRunner)
    return [cls.options(name=f"{name}-{i}", scheduling_strategy="SPREAD").remote(
        str(run_dir), cfg.to_dict(), worker_index=i) for i in range(n)]


def run_episodes(runners, params, seeds, max_steps: int, desc: str | None = None) -> np.ndarray:
    """Episodes spread over the runners, one seed each; returns their totals in seed order."""
    results = {}
    bar = progress(len(seeds), desc) if desc else None
    for (i, _), ref in keep_busy(runners, list(enumerate(seeds)),
                                 lambda r, job: r.episode.remote(params, job[1], max_steps)):
        results[i] = ray.get(ref)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return np.array([results[i] for i in range(len(seeds))])


def play_real(run_dir: Path, cfg: Config, policies: dict, episodes: int,
              name: str = "real-evaluator") -> dict[str, np.ndarray]:
    """Real-env returns of each policy (flat params, a policy callable, or None for random) on
    `evaluate.seed ..`, the seeds every scorer shares, in a pool of parallel actors."""
    seeds = [cfg.evaluate.seed + i for i in range(episodes)]
    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    runners = runner_pool(run_dir, cfg, min(episodes, cpus), name=name)
    try:
        return {label: run_episodes(runners, policy, seeds, cfg.evaluate.max_steps, label)
                for label, policy in policies.items()}
    finally:
        close_and_kill(runners)


def return_stats(returns: np.ndarray, prefix: str) -> dict:
    """Mean, std and standard error of episode returns, as `<prefix>_mean` etc."""
    n = len(returns)
    return {f"{prefix}_mean": float(returns.mean()), f"{prefix}_std": float(returns.std()),
            f"{prefix}_se": float(returns.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0}


def evaluate(cfg: Config, run_dir: Path, episodes: int | None = None, log=print) -> dict:
    start = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    # a planner needs only the world model: any run can be scored with --set controller.kind=mpc
    params, generation = (np.zeros(0), 0) if cfg.controller.kind == "mpc" else \
        load_controller_params(run_dir)
    check_world_model(run_dir)
    n = episodes or cfg.evaluate.episodes
    played = play_real(run_dir, cfg, {"evaluate": params, "random": None}, n)
    ctrl, rand = played["evaluate"], played["random"]
    figures = {**return_stats(ctrl, "real_return"), **return_stats(rand, "random_return"),
               "episodes": n, "evaluated_generation": generation,
               "controller_kind": cfg.controller.kind,
               "wall_s": time.perf_counter() - start}
    log(f"evaluate over {n} episodes: controller {figures['real_return_mean']:.2f} +/- "
        f"{figures['real_return_std']:.2f} (se {figures['real_return_se']:.2f}) | random "
        f"{figures['random_return_mean']:.2f} +/- {figures['random_return_std']:.2f} "
        f"(se {figures['random_return_se']:.2f})")
    return figures
