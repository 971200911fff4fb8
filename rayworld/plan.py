"""Plan in the dream: the cross-entropy method (CEM) over action sequences, model-predictive.

At each real step the agent hands the planner its own [z, h] (the frame's latent and the
MDN-RNN state after the real history). The planner dreams `candidates` action sequences of
`horizon` planned actions from there, all in one batched MDN-RNN pass per dream step, keeps the
`elites` best, refits its sampling distribution to them and repeats `iterations` times. The
agent acts on the first action of the final plan, holds it `action_repeat` steps, then plans
again from the real frame it sees, warm-started from the rest of the last plan. Re-planning
from real frames keeps the model's errors from compounding over a whole episode.

Continuous actions: a diagonal Gaussian per planned step, clipped to the action range.
Discrete actions (Atari): a categorical per planned step, refitted to the elites' choices.
"""

from __future__ import annotations

import torch

from rayworld.dream import BatchedDream, WorldModel, action_bounds

SMOOTHING = 0.05  # categorical CEM: the share of probability spread evenly, so no action dies


class Planner:
    """CEM over the batched dream. `act(z, state)` -> the action [1, A] (discrete: [1]).

    `pc` is a rayworld.config.PlanConfig. Each candidate dreams `pc.rollouts` times; with
    rollouts > 1 row r of every candidate meets the same dream noise (common random numbers).
    """

    stateful = True  # the Agent hands it the whole LSTM state, not only h

    def __init__(self, world: WorldModel, pc, seed: int = 0):
        self.world, self.pc = world, pc
        self.dream = BatchedDream(world, pc.tau, pc.horizon * pc.action_repeat, pc.dropout,
                                  pc.done, pc.ensemble)
        self.discrete = world.discrete
        if not self.discrete:
            low, high = action_bounds(world.action_dim)
            self.low, self.high = torch.from_numpy(low), torch.from_numpy(high)
        # the search samples on the CPU (small tensors); the dream runs where the model is
        self.gen = torch.Generator().manual_seed(seed)
        self.dream_gen = torch.Generator(device=world.device).manual_seed(seed + 1)
        self.reset()

    def reseed(self, seed: int):
        self.gen.manual_seed(int(seed))
        self.dream_gen.manual_seed(int(seed) + 1)

    def reset(self):
        """A new episode: no plan to warm-start from."""
        self.plan, self.action, self.t = None, None, 0

    @torch.no_grad()
    def act(self, z: torch.Tensor, state) -> torch.Tensor:
        if self.action is None or self.t % self.pc.action_repeat == 0:
            self.action = self.replan(z, state)
        self.t += 1
        return self.action

    @torch.no_grad()
    def score(self, z: torch.Tensor, state, actions: torch.Tensor) -> torch.Tensor:
        """Mean dream return of each action sequence from one [z, (h, c)]: actions [N, H, A]
        (discrete: [N, H]) -> [N]. Every candidate's rollouts run in one batch."""
        pc, n = self.pc, len(actions)
        b = n * pc.rollouts
        zz = z.expand(b, -1).clone()
        st = tuple(s.expand(-1, b, -1).contiguous() for s in state)
        self.dream.begin(b, self.dream_gen, shared=n)
        # candidate-major rows, as BatchedDream lays out common random numbers
        rows = actions.to(z.device).repeat_interleave(pc.rollouts, 0)
        total = torch.zeros(b, device=z.device)
        alive = torch.ones(b, device=z.device)
        for t in range(rows.shape[1]):
            for _ in range(pc.action_repeat):
                zz, st, reward, done = self.dream.step(zz, st, rows[:, t], self.dream_gen,
                                                       shared=n)
                total += reward * alive
                alive = alive * (1 - self.dream.done_p) if pc.done == "survival" else \
                    alive * ~done
        return total.view(n, pc.rollouts).mean(1).cpu()

    def replan(self, z: torch.Tensor, state) -> torch.Tensor:
        return self._categorical(z, state) if self.discrete else self._gaussian(z, state)

    def _gaussian(self, z, state) -> torch.Tensor:
        pc = self.pc
        span = (self.high - self.low) / 2
        mean = self.plan if self.plan is not None else \
            ((self.low + self.high) / 2).expand(pc.horizon, -1).clone()
        std = (pc.std * span).expand(pc.horizon, -1).clone()
        for _ in range(pc.iterations):
            eps = torch.randn(pc.candidates, *mean.shape, generator=self.gen)
            cand = torch.maximum(torch.minimum(mean + std * eps, self.high), self.low)
            cand[0] = mean  # the current plan stays in the race
            elite = cand[self.score(z, state, cand).topk(pc.elites).indices]
            mean = elite.mean(0)
            std = torch.maximum(elite.std(0, unbiased=False), pc.min_std * span)
        self.plan = torch.cat([mean[1:], mean[-1:]])  # shifted: the next plan's start
        return mean[:1].clone()

    def _categorical(self, z, state) -> torch.Tensor:
        pc, n = self.pc, self.world.action_n
        even = torch.full((pc.horizon, n), 1.0 / n)
        probs = self.plan if self.plan is not None else even
        for _ in range(pc.iterations):
            cand = torch.multinomial(probs, pc.candidates, replacement=True,
                                     generator=self.gen).T  # [N, H]
            cand[0] = probs.argmax(-1)
            elite = cand[self.score(z, state, cand).topk(pc.elites).indices]
            chosen = torch.nn.functional.one_hot(elite, n).float().mean(0)
            probs = (1 - SMOOTHING) * chosen + SMOOTHING * even
        self.plan = torch.cat([probs[1:], even[-1:]])
        return probs[0].argmax().reshape(1)
