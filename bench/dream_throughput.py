"""Dream steps/s per core: B rollouts batched in one MDN-RNN pass vs a reference loop that steps
one rollout the way the World Models reference implementations do (nn.LSTMCell, one mixture
component drawn with torch.multinomial per latent dim, every step), vs rayworld's own batch-1
path, and vs the real CarRacing-v3 on the same cores.

    python bench/dream_throughput.py [--run runs/quickstart] [--population 64 --rollouts 16]
                                     [--steps 100] [--threads 1] [--device cpu|cuda]

Without --run the MDN-RNN has the paper's size (z 32, hidden 256, 5 mixtures) and random
weights: speed does not depend on training. Targets: batched >= 30x the reference loop per
core, and >= 10x rayworld's own batch-1 path.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from collect_throughput import vector_rate  # the same real-env baseline

from rayworld.dream import BatchedDream, WorldModel, evaluate_population
from rayworld.models.controller import Controller
from rayworld.models.mdn import MDNRNN


def world_model(run: str | None) -> WorldModel:
    if run:
        return WorldModel.load(run)
    torch.manual_seed(0)
    return WorldModel(MDNRNN(32, 3, 256, 5).eval(), torch.randn(64, 32), torch.zeros(64, 32),
                      3, False, 0)


def dream_rate(world, population: int, rollouts: int, steps: int) -> float:
    dream = BatchedDream(world, tau=1.0, max_steps=steps)
    dream.step = _never_done(dream.step)  # time full-length rollouts
    template = Controller(world.latent, world.hidden, world.action_dim).to(world.device)
    params = np.random.default_rng(0).normal(0, 0.1, (population, template.num_params))
    t0 = time.perf_counter()
    evaluate_population(dream, template, params, rollouts, seed=0)
    return population * rollouts * steps / (time.perf_counter() - t0)


@torch.no_grad()
def reference_rate(world, steps: int, tau: float = 1.0) -> float:
    """One rollout stepped alone, as the reference implementations do (same weights)."""
    mdn = world.mdn
    cell = torch.nn.LSTMCell(mdn.lstm.input_size, mdn.hidden).to(world.device)
    cell.load_state_dict({k[:-3]: v for k, v in mdn.lstm.state_dict().items()})
    controller = torch.nn.Linear(world.latent + world.hidden, world.action_dim).to(world.device)
    z = world.z0_mu[:1]
    h = c = torch.zeros(1, mdn.hidden, device=world.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        a = torch.tanh(controller(torch.cat([z, h], 1)))
        h, c = cell(torch.cat([z, a], 1), (h, c))
        p = mdn.mdn_head(h).view(world.latent, 3, mdn.mixtures)
        probs = torch.softmax(p[:, 0] / tau, -1)
        k = torch.multinomial(probs, 1)  # [Z, 1]: one component per latent dim
        mu, log_sigma = p[:, 1].gather(1, k), p[:, 2].gather(1, k)
        z = (mu + log_sigma.exp() * tau ** 0.5 * torch.randn_like(mu)).view(1, -1)
        mdn.reward_head(h), mdn.done_head(h)
    return steps / (time.perf_counter() - t0)


@torch.no_grad()
def matmul_bound(world, batch: int, steps: int) -> float:
    """Steps/s if a dream step were nothing but its two big matmuls (the LSTM's gates and the
    heads, at the batch's size): no step can beat it on these cores, whatever is fused."""
    mdn, dev = world.mdn, world.device
    gates = torch.cat([mdn.lstm.weight_ih_l0, mdn.lstm.weight_hh_l0], 1).t().contiguous()
    heads = mdn._fused_heads()[0]  # every head's weight^T, as the step multiplies them
    x = torch.randn(batch, gates.shape[0], device=dev)
    h = torch.randn(batch, heads.shape[0], device=dev)
    for _ in range(3):
        x @ gates, h @ heads
    t0 = time.perf_counter()
    for _ in range(steps):
        x @ gates, h @ heads
    return batch * steps / (time.perf_counter() - t0)


def _never_done(step):
    def wrapped(*args, **kwargs):
        z, state, reward, done = step(*args, **kwargs)
        return z, state, reward, torch.zeros_like(done)
    return wrapped


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None)
    p.add_argument("--population", type=int, default=64)
    p.add_argument("--rollouts", type=int, default=16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="per core: 1")
    p.add_argument("--real-seconds", type=float, default=10.0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    world = world_model(args.run).to(args.device)
    dream_rate(world, 4, 4, 10)  # warm-up
    batched = dream_rate(world, args.population, args.rollouts, args.steps)
    single = dream_rate(world, 1, 1, args.steps * 4)
    reference = reference_rate(world, args.steps * 4)
    real = vector_rate("rayworld/CarRacing-v0", args.threads, args.real_seconds)
    b = args.population * args.rollouts
    bound = matmul_bound(world, b, args.steps)
    print(f"device {args.device}, {args.threads} CPU thread(s)")
    print(f"dream, {b} rollouts batched      : {batched:10.0f} steps/s")
    print(f"dream, rayworld one at a time     : {single:10.0f} steps/s")
    print(f"reference loop (LSTMCell, multinomial): {reference:10.0f} steps/s")
    print(f"real CarRacing-v3, {args.threads} proc(s)       : {real:10.0f} steps/s")
    print(f"batched / reference loop: {batched / reference:.1f}x (target >= 30x: "
          f"{'PASS' if batched / reference >= 30 else 'FAIL'})")
    print(f"the step's matmuls alone, {b} rows: {bound:10.0f} steps/s = {bound / reference:.1f}x "
          "the reference loop (no float32 step on these cores can pass it)")
    print(f"batched / rayworld one-at-a-time: {batched / single:.1f}x (target >= 10x: "
          f"{'PASS' if batched / single >= 10 else 'FAIL'})")
    print(f"batched dream / real CarRacing: {batched / real:.1f}x")


if __name__ == "__main__":
    main()
