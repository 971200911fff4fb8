"""Env steps/s on one core: SimpleDriving (target >= 3,000) next to the CarRacing-v3 wrapper.

    python bench/env_speed.py [--seconds 10]

Random actions, reset when an episode ends, rendering included (the obs is the render).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


def steps_per_s(env_id: str, seconds: float) -> float:
    from rayworld.envs import make_env

    env = make_env(env_id)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    low, high = env.action_space.low, env.action_space.high
    steps, episode, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        _, _, term, trunc, _ = env.step(rng.uniform(low, high).astype(np.float32))
        steps += 1
        if term or trunc:
            episode += 1
            env.reset(seed=episode)
    return steps / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    simple = steps_per_s("rayworld/SimpleDriving-v0", args.seconds)
    car = steps_per_s("rayworld/CarRacing-v0", args.seconds)
    print(f"SimpleDriving-v0 : {simple:8.0f} steps/s on one core "
          f"(target >= 3000: {'PASS' if simple >= 3000 else 'FAIL'})")
    print(f"CarRacing-v3 64px: {car:8.0f} steps/s on one core")
    print(f"ratio SimpleDriving/CarRacing: {simple / car:.1f}x")


if __name__ == "__main__":
    main()
