"""Collection env steps/s: N Ray actors vs 1 actor vs gymnasium's AsyncVectorEnv with N workers.

    python bench/collect_throughput.py [--envs rayworld/SimpleDriving-v0 rayworld/CarRacing-v0]
                                       [--actors 2] [--seconds 20]

The actor sides run the real collection path (episodes stepped in actors, Parquet shards
written, manifest kept); actors are started and warmed up before the clock starts. Target:
N actors >= 0.8 x N x one actor.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from rayworld.collect import Collector, _dispatch
from rayworld.config import load_config
from rayworld.data import Manifest


def episodes_for(env_id: str, seconds: float, n: int) -> tuple[int, int]:
    """Episode count and length that keep each actor busy for about `seconds`."""
    steps = 200 if "CarRacing" in env_id else 500
    rate = 150 if "CarRacing" in env_id else 2500  # rough steps/s per core
    return max(2 * n, int(seconds * rate * n / steps)), steps


def actors_rate(env_id: str, n: int, seconds: float) -> float:
    episodes, steps = episodes_for(env_id, seconds, n)
    cfg = load_config(None, [f"env.id={env_id}", f"collect.max_steps={steps}"])
    out = Path(tempfile.mkdtemp(prefix="rayworld-bench-"))
    cls = ray.remote(num_cpus=1)(Collector)
    actors = [cls.remote(env_id, {}, str(out / "data" / "episodes"), "brownian", 0.5, "zstd")
              for _ in range(n)]
    ray.get([a.run.remote(10**6 + i, 10**6 + i, 20) for i, a in enumerate(actors)])  # warm up
    manifest = Manifest(out / "data", {}, {})
    t0 = time.perf_counter()
    total = _dispatch(actors, list(range(episodes)), manifest, cfg.collect, print)
    rate = total / (time.perf_counter() - t0)
    for a in actors:
        ray.kill(a)
    return rate


def vector_rate(env_id: str, n: int, seconds: float) -> float:
    import gymnasium as gym

    import rayworld.envs as envs

    vec = gym.vector.AsyncVectorEnv([lambda: envs.make_env(env_id) for _ in range(n)])
    vec.reset(seed=0)
    rng = np.random.default_rng(0)
    low, high = vec.single_action_space.low, vec.single_action_space.high
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        vec.step(rng.uniform(low, high, (n, len(low))).astype(np.float32))
        steps += n
    rate = steps / (time.perf_counter() - t0)
    vec.close()
    return rate


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", nargs="+",
                   default=["rayworld/SimpleDriving-v0", "rayworld/CarRacing-v0"])
    p.add_argument("--actors", type=int, default=os.cpu_count())
    p.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args()
    n = args.actors
    ray.init(num_cpus=n, include_dashboard=False, object_store_memory=300 * 2**20,
             log_to_driver=False)
    rows = []
    for env_id in args.envs:
        one = actors_rate(env_id, 1, args.seconds)
        many = actors_rate(env_id, n, args.seconds)
        vec = vector_rate(env_id, n, args.seconds)
        rows.append((env_id, one, many, vec))
    ray.shutdown()
    print(f"\n{'env':28s} {'1 actor':>10s} {f'{n} actors':>10s} {f'AsyncVec x{n}':>13s} "
          f"{'scaling':>8s} {'vs AsyncVec':>11s}")
    for env_id, one, many, vec in rows:
        scale = many / one
        print(f"{env_id:28s} {one:10.0f} {many:10.0f} {vec:13.0f} {scale:7.2f}x {many / vec:10.2f}x"
              f"   target scaling >= {0.8 * n:.1f}x: {'PASS' if scale >= 0.8 * n else 'FAIL'}")


if __name__ == "__main__":
    main()
