"""Planning time per real step (controller.kind mpc): every CEM candidate dreamt in one batch vs
one candidate at a time, on the same model and cores.

    python bench/plan_latency.py [--run runs/quickstart] [--horizon 12 --candidates 64
                                 --iterations 3 --elites 8 --action-repeat 2] [--threads 1]
                                 [--device cpu|cuda] [--plans 20]

Without --run the MDN-RNN has the paper's size (z 32, hidden 256, 5 mixtures, 3 actions) and
random weights: the time does not depend on training. One at a time runs the same CEM, but
scores each candidate's dream by itself, as a planner without a batched world model must.
"""

from __future__ import annotations

import argparse
import time

import torch
from dream_throughput import world_model

from rayworld.config import PlanConfig
from rayworld.plan import Planner


class OneAtATime(Planner):
    """The same search, each candidate's dream stepped alone."""

    def score(self, z, state, actions):
        return torch.cat([Planner.score(self, z, state, actions[i:i + 1])
                          for i in range(len(actions))])


def seconds_per_plan(planner: Planner, plans: int) -> float:
    world = planner.world
    z = world.z0_mu[:1].to(world.device)
    state = world.mdn.initial_state(1)
    planner.replan(z, state)  # warm-up
    t0 = time.perf_counter()
    for _ in range(plans):
        planner.replan(z, state)
    return (time.perf_counter() - t0) / plans


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None)
    p.add_argument("--horizon", type=int, default=12)
    p.add_argument("--candidates", type=int, default=64)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--elites", type=int, default=8)
    p.add_argument("--action-repeat", type=int, default=2)
    p.add_argument("--plans", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="an evaluate actor uses 1")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    world = world_model(args.run).to(args.device)
    pc = PlanConfig(horizon=args.horizon, candidates=args.candidates,
                    iterations=args.iterations, elites=args.elites,
                    action_repeat=args.action_repeat)
    batched = seconds_per_plan(Planner(world, pc), args.plans)
    single = seconds_per_plan(OneAtATime(world, pc), max(1, args.plans // 10))
    steps = pc.iterations * pc.horizon * pc.action_repeat
    r = pc.action_repeat
    print(f"device {args.device}, {args.threads} thread(s); {pc.candidates} candidates x "
          f"{pc.horizon} planned actions x {pc.action_repeat} repeat x {pc.iterations} "
          f"iterations = {steps} batched dream steps per plan")
    print(f"batched          : {batched * 1e3:8.1f} ms per plan, {batched / r * 1e3:8.1f} ms "
          f"per real step")
    print(f"one at a time    : {single * 1e3:8.1f} ms per plan, {single / r * 1e3:8.1f} ms "
          f"per real step")
    print(f"one at a time / batched: {single / batched:.1f}x")


if __name__ == "__main__":
    main()
