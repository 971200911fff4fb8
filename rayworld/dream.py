"""Stage 5, dream: the environment the world model imagines, batched over B rollouts.

One forward pass of the MDN-RNN steps every rollout at once: B = population x rollouts per
candidate. Dreams start from latents of real first frames (encoded by the VAE), or from states
anywhere in the collected episodes (`data_starts`). A rollout ends when the done head says so
(probability > 0.5) or at max_steps.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from rayworld import storage
from rayworld.data import Manifest
from rayworld.encode import SERIES
from rayworld.models.controller import Controller
from rayworld.models.mdn import MDNRNN, sample_next, select_member
from rayworld.train.common import load_model_file

DROPOUT_MODES = ("off", "rollout", "step")
DONE_MODES = ("threshold", "survival")
ENSEMBLE_MODES = ("member", "pessimistic")


@dataclass
class WorldModel:
    """The trained MDN-RNN plus the real latents that dreams start from: the episodes' first
    frames (LSTM state zero), or, after `with_data_starts`, states anywhere in them."""

    mdn: MDNRNN
    z0_mu: torch.Tensor  # [N, Z]
    z0_logvar: torch.Tensor  # [N, Z]
    action_dim: int
    discrete: bool
    action_n: int
    done_pos_weight: float = 1.0  # the done head was trained with it; undone in done_prob
    h0: torch.Tensor | None = None  # [N, H] the LSTM state at each start; None: zeros
    c0: torch.Tensor | None = None

    @property
    def latent(self) -> int:
        return self.z0_mu.shape[1]

    @property
    def hidden(self) -> int:
        return self.mdn.hidden

    @property
    def device(self) -> torch.device:
        return self.z0_mu.device

    def to(self, device) -> WorldModel:
        """A copy on `device` (e.g. "cuda"): dreams then run where the model is."""
        move = (lambda t: None if t is None else t.to(device))
        return WorldModel(copy.deepcopy(self.mdn).to(device), self.z0_mu.to(device),
                          self.z0_logvar.to(device), self.action_dim, self.discrete,
                          self.action_n, self.done_pos_weight, move(self.h0), move(self.c0))

    @classmethod
    def load(cls, run_dir: Path) -> WorldModel:
        from rayworld.data import start_latents

        run_dir = Path(run_dir)
        state = load_model_file(run_dir / "checkpoints" / "mdn.pt", "train-mdn")
        mdn = MDNRNN(latent=state["latent"], action_dim=state["action_dim"],
                     hidden=state["hidden"], mixtures=state["mixtures"],
                     action_n=state.get("action_n", 0), dropout=state.get("dropout", 0.0),
                     ensemble=state.get("ensemble", 1),
                     reward_from=state.get("reward_from", "h"))
        mdn.load_state_dict(state["model"])
        series = Manifest.load(run_dir / "data", SERIES, stage="encode")
        episodes = Manifest.load(run_dir / "data")
        mus, logvars = start_latents(series)  # every actor does this at start-up: one file
        return cls(mdn.eval(), torch.from_numpy(mus), torch.from_numpy(logvars),
                   state["action_dim"],
                   bool(episodes.info.get("discrete", False)),
                   int(episodes.info.get("action_n", 0)),
                   float(state.get("done_pos_weight", 1.0)))

    def with_data_starts(self, run_dir: Path, count: int, seed: int,
                         sample: bool = True) -> WorldModel:
        """A copy whose dreams start at `count` states drawn uniformly from every step of the
        collected episodes: the frame's latent there, and the LSTM state after the episode's
        real latents and actions up to it (teacher forcing). Short dreams from such states
        (model-based RL's branched rollouts) stay where the model was trained, so a controller
        is scored on what the data shows, not on what a long open-loop dream drifts into."""
        storage.refresh(run_dir, "data/series")  # a run in object storage: on this node
        series = Manifest.load(Path(run_dir) / "data", SERIES, stage="encode")
        mu, logvar, h, c = data_starts(self.mdn, series, count, seed, sample)
        return WorldModel(self.mdn, mu, logvar, self.action_dim, self.discrete, self.action_n,
                          self.done_pos_weight, h, c)

    def done_prob(self, done_logit: torch.Tensor) -> torch.Tensor:
        """P(episode ends), calibrated: a positive-class weight w shifts the logit by log w."""
        return torch.sigmoid(done_logit - math.log(self.done_pos_weight))


@torch.no_grad()
def data_starts(mdn: MDNRNN, series: Manifest, count: int, seed: int, sample: bool = True):
    """(mu, logvar, h, c) at `count` steps drawn uniformly over every encoded step (at most
    the whole data; in step order), the same for a given seed. The LSTM reads each episode's
    real actions and latents up to the drawn step: sampled from (mu, logvar), or the means
    (`sample` False), as the real-env agent feeds them (controller.z). Episodes step together."""
    from rayworld.data import read_series

    episodes = sorted(series.shards)
    steps = np.array([int(series.shards[e]["steps"]) for e in episodes])
    ends = np.cumsum(steps)
    rng = np.random.default_rng([seed, 5])
    flat = np.sort(rng.choice(ends[-1], size=min(count, int(ends[-1])), replace=False))
    which = np.searchsorted(ends, flat, side="right")
    at = flat - (ends - steps)[which]
    needed = np.unique(which)
    slot = {int(e): k for k, e in enumerate(needed)}
    length = int(at.max())
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(needed), length, mdn.lstm.input_size)
    mus, logvars = [], []
    for k, i in enumerate(needed):
        ep = read_series(series.file(episodes[i]))
        mu = torch.tensor(ep["mu"], dtype=torch.float32)
        logvar = torch.tensor(ep["logvar"], dtype=torch.float32)
        mus.append(mu)
        logvars.append(logvar)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen) if sample else mu
        n = min(length, len(mu))
        act = mdn.action_input(torch.from_numpy(ep["action"][:n]).float()).float()
        x[k, :n] = torch.cat([z[:n], act.reshape(n, -1)], dim=1)
    lstm = mdn.lstm
    h = torch.zeros(len(needed), mdn.hidden)
    c = torch.zeros_like(h)
    out = {}
    for t in range(length + 1):
        for r in np.flatnonzero(at == t):
            k = slot[int(which[r])]
            out[r] = (mus[k][t], logvars[k][t], h[k], c[k])
        if t < length:
            h, c = torch.lstm_cell(x[:, t], (h, c), lstm.weight_ih_l0, lstm.weight_hh_l0,
                                   lstm.bias_ih_l0, lstm.bias_hh_l0)
    return tuple(torch.stack([out[r][j] for r in range(len(flat))]) for j in range(4))


class BatchedDream:
    """B independent dream rollouts stepped together; torch in, torch out.

    `shared` > 1 gives common random numbers: rows come as `shared` consecutive blocks of
    B / shared rollouts, and row r of every block gets the same start latent, the same dream
    noise, the same dropout mask and the same ensemble member. Blocks are CMA-ES candidates,
    so every candidate of a generation meets the same dreams and the ranking reflects the
    controllers.
    `dropout`: "off", "rollout" (one mask per rollout, kept for all its steps) or "step" (a
    new mask every step), at the rate the MDN-RNN trained with (mdn.dropout).
    `ensemble` (an MDN-RNN with E > 1 head sets): each rollout follows one member, drawn at
    random when it starts (row r of every block alike); "pessimistic" also scores every step
    with the lowest reward any member predicts.
    """

    def __init__(self, world: WorldModel, tau: float = 1.0, max_steps: int = 1000,
                 dropout: str = "off", done: str = "threshold", ensemble: str = "member"):
        if dropout not in DROPOUT_MODES:
            raise ValueError(f"dream dropout {dropout!r}: expected one of {DROPOUT_MODES}")
        if done not in DONE_MODES:
            raise ValueError(f"dream done {done!r}: expected one of {DONE_MODES}")
        if ensemble not in ENSEMBLE_MODES:
            raise ValueError(f"dream ensemble {ensemble!r}: expected one of {ENSEMBLE_MODES}")
        self.world, self.tau, self.max_steps, self.done = world, tau, max_steps, done
        self.ensemble = ensemble
        self.done_p = None  # the last step's P(episode ends) [B]
        self.dropout = dropout if world.mdn.dropout > 0 else "off"
        self.mask = None  # the rollouts' dropout masks [B, H]
        self.member = None  # the rollouts' ensemble members [B]

    def _draw(self, fn, batch: int, width: int, shared: int, gen) -> torch.Tensor:
        x = fn(batch // shared, width, generator=gen, device=self.world.device)
        return x.repeat(shared, 1) if shared > 1 else x

    def new_mask(self, batch: int, shared: int, gen):
        if self.dropout == "off":
            return None
        mask = self.world.mdn.dropout_mask(batch // shared, gen, self.world.device)
        return mask.repeat(shared, 1) if shared > 1 else mask

    def new_members(self, batch: int, shared: int, gen):
        """Each rollout's ensemble member, random and the same for row r of every block
        (None for a single model: nothing drawn, so its dreams stay as they were)."""
        e = self.world.mdn.ensemble
        if e == 1:
            return None
        m = torch.randint(e, (batch // shared,), generator=gen, device=self.world.device)
        return m.repeat(shared) if shared > 1 else m

    def _start(self, n: int, gen) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """n start latents, and their LSTM states (None: zeros, the episodes' first frames)."""
        w = self.world
        idx = torch.randint(len(w.z0_mu), (n,), generator=gen, device=w.device)
        eps = torch.randn(n, w.latent, generator=gen, device=w.device)
        z = w.z0_mu[idx] + torch.exp(0.5 * w.z0_logvar[idx]) * eps
        if w.h0 is None:
            return z, None, None
        return z, w.h0[idx], w.c0[idx]

    def begin(self, batch: int, generator: torch.Generator, shared: int = 1):
        """New dropout masks and ensemble members for `batch` rollouts that start now (from
        reset's real first frames, or from any state: a planner's current [z, h])."""
        self.mask = self.new_mask(batch, shared, generator)
        self.member = self.new_members(batch, shared, generator)

    @torch.no_grad()
    def reset(self, batch: int, generator: torch.Generator, shared: int = 1):
        w = self.world
        z, h, c = self._start(batch // shared, generator)
        self.begin(batch, generator, shared)
        rep = (lambda t: t.repeat(shared, 1) if shared > 1 else t)
        if h is None:
            return rep(z), w.mdn.initial_state(batch)
        return rep(z), (rep(h).unsqueeze(0).contiguous(), rep(c).unsqueeze(0).contiguous())

    @torch.no_grad()
    def restart(self, z, state, rows: torch.Tensor, generator: torch.Generator):
        """New dreams in `rows` (in place): fresh start latents and their LSTM states, and, for
        rollout dropout and ensembles, new masks and members."""
        z[rows], h, c = self._start(len(rows), generator)
        state[0][:, rows] = 0.0 if h is None else h
        state[1][:, rows] = 0.0 if c is None else c
        if self.mask is not None and self.dropout == "rollout":
            self.mask[rows] = self.new_mask(len(rows), 1, generator)
        if self.member is not None:
            self.member[rows] = self.new_members(len(rows), 1, generator)

    def action_input(self, action: torch.Tensor) -> torch.Tensor:
        """Actions as the shards hold them: a vector, or [index] (the MDN-RNN one-hots it)."""
        return action.float().reshape(len(action), -1)

    @torch.no_grad()
    def step(self, z, state, action, generator: torch.Generator, shared: int = 1):
        if self.dropout == "step" or (self.dropout == "rollout" and self.mask is None):
            self.mask = self.new_mask(len(z), shared, generator)
        mask = self.mask if self.dropout != "off" else None
        mdn = self.world.mdn
        every, state = mdn.step(z, self.action_input(action), state, mask)
        out = every
        if mdn.ensemble > 1:
            if self.member is None or len(self.member) != len(z):  # stepped without reset
                self.member = self.new_members(len(z), shared, generator)
            out = select_member(every, self.member)
        noise = None if self.tau <= 0 else (  # tau 0: the mean, nothing to draw
            self._draw(torch.rand, len(z), z.shape[1], shared, generator),
            self._draw(torch.randn, len(z), z.shape[1], shared, generator))
        z_next = sample_next(out, self.tau, noise=noise)
        reward = every.reward if mdn.reward_from == "h" else mdn.latent_reward(z, z_next)
        if mdn.ensemble > 1:  # [E, B]: the lowest, or the row's own member's
            reward = reward.min(0).values if self.ensemble == "pessimistic" else \
                reward[self.member, torch.arange(len(z), device=z.device)]
        self.done_p = self.world.done_prob(out.done_logit)
        return z_next, state, reward, self.done_p > 0.5

    def action_gap(self, action: torch.Tensor, ref_action: torch.Tensor) -> torch.Tensor:
        """How far each row's action is from the reference's [B]: the squared distance, or
        1 where a discrete action differs."""
        if self.world.discrete:
            return (action.reshape(len(action)) != ref_action.reshape(len(action))).float()
        return (action.float() - ref_action.float()).reshape(len(action), -1).pow(2).sum(1)

    @torch.no_grad()
    def rollout(self, policy, batch: int, seed: int, shared: int = 1,
                max_steps: int | None = None, ref=None, anchor: float = 0.0) -> torch.Tensor:
        """Returns each rollout's total dream reward [B]. policy(z, h) -> actions [B, A].

        done "threshold": a rollout ends where P(end) > 0.5. "survival": every reward is
        weighted by the probability that the episode is still running, so steps where the
        model is unsure whether the car is still on the road count for less.
        ref, anchor: every step also costs anchor x action_gap(policy, ref) on the same
        state, so the policy leaves the reference (the behaviour clone) only where the
        dream's gain is worth it (a behaviour-regularised objective, as in offline RL).
        """
        gen = torch.Generator(device=self.world.device).manual_seed(seed)
        z, state = self.reset(batch, gen, shared)
        total = torch.zeros(batch, device=z.device)
        alive = torch.ones(batch, device=z.device)
        for _ in range(max_steps or self.max_steps):
            h = state[0][0]
            action = policy(z, h)
            if ref is not None and anchor > 0:
                total -= anchor * self.action_gap(action, ref(z, h)) * alive
            z, state, reward, done = self.step(z, state, action, gen, shared)
            total += reward * alive
            alive = alive * (1 - self.done_p) if self.done == "survival" else alive * ~done
            if not (alive > 1e-3).any():
                break
        return total


class Population:
    """P controllers evaluated together: each layer is one batched matmul over the stacked
    weights of every candidate (no per-candidate modules, no vmap)."""

    def __init__(self, template: Controller, flat_params: np.ndarray, repeats: int):
        self.template, self.repeats = template, repeats
        ref = next(template.parameters())
        flat = torch.as_tensor(np.atleast_2d(flat_params), dtype=ref.dtype, device=ref.device)
        if flat.shape[1] != template.num_params:
            raise ValueError(f"expected {template.num_params} parameters, got {flat.shape[1]}")
        self.size = len(flat)
        self.layers, offset = [], 0
        for layer in template.net:
            if not isinstance(layer, torch.nn.Linear):
                continue
            w, b = layer.weight, layer.bias  # parameters() order: weight, then bias
            weight = flat[:, offset:offset + w.numel()].view(self.size, *w.shape)
            offset += w.numel()
            bias = flat[:, offset:offset + b.numel()].view(self.size, 1, b.numel())
            offset += b.numel()
            self.layers.append((weight.transpose(1, 2).contiguous(), bias.contiguous()))

    def __call__(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        # rows are candidate-major: candidate p owns rows [p*repeats, (p+1)*repeats)
        x = torch.cat([z, h[:, :self.template.hidden]], dim=1).view(self.size, self.repeats, -1)
        for i, (weight, bias) in enumerate(self.layers):
            x = torch.baddbmm(bias, x, weight)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return self.template.to_action(x.reshape(self.size * self.repeats, -1))


def evaluate_population(dream: BatchedDream, template: Controller, flat_params: np.ndarray,
                        rollouts: int, seed: int, common: bool = True,
                        max_steps: int | None = None, ref_params: np.ndarray | None = None,
                        anchor: float = 0.0) -> np.ndarray:
    """Mean dream return per candidate, all candidates x rollouts in one batch.

    common: every candidate meets the same `rollouts` dreams (common random numbers).
    ref_params, anchor: the return less anchor x the action gap to that controller (rollout).
    """
    pop = Population(template, flat_params, rollouts)
    ref = None
    if ref_params is not None and anchor > 0:
        ref = copy.deepcopy(template)
        ref.set_flat(ref_params)
    returns = dream.rollout(pop, pop.size * rollouts, seed, shared=pop.size if common else 1,
                            max_steps=max_steps, ref=ref, anchor=anchor)
    return returns.reshape(pop.size, rollouts).mean(1).double().cpu().numpy()


def dream_spaces(world: WorldModel) -> tuple[gym.spaces.Box, gym.spaces.Space]:
    """One dream step's spaces: obs [z, h] (float32) and the real env's actions."""
    size = world.latent + world.hidden
    obs = gym.spaces.Box(-np.inf, np.inf, (size,), np.float32)
    if world.discrete:
        return obs, gym.spaces.Discrete(world.action_n)
    return obs, gym.spaces.Box(*action_bounds(world.action_dim))


def action_bounds(action_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The controller's ranges: CarRacing/CARLA's [steer, gas, brake], else tanh's [-1, 1]."""
    low = np.array([-1, 0, 0], np.float32) if action_dim == 3 else -np.ones(action_dim, np.float32)
    return low, np.ones(action_dim, np.float32)


class DreamEnv(gym.Env):
    """One dream rollout as a gymnasium env: obs = [z, h] (float32), the real env's actions."""

    metadata = {"render_modes": []}

    def __init__(self, run_dir: str, tau: float = 1.0, max_steps: int = 1000):
        world = WorldModel.load(Path(run_dir))
        self.dream = BatchedDream(world, tau, max_steps)
        self.observation_space, self.action_space = dream_spaces(world)
        self._gen = torch.Generator()

    def _obs(self):
        return torch.cat([self._z[0], self._state[0][0, 0]]).numpy().astype(np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._gen.manual_seed(int(self.np_random.integers(2**31)))
        self._z, self._state = self.dream.reset(1, self._gen)
        self._t = 0
        return self._obs(), {}

    def step(self, action):
        a = torch.as_tensor(np.asarray(action, np.float32)).reshape(1, -1)
        self._z, self._state, reward, done = self.dream.step(self._z, self._state, a, self._gen)
        self._t += 1
        truncated = self._t >= self.dream.max_steps and not bool(done[0])
        return self._obs(), float(reward[0]), bool(done[0]), truncated, {}


class DreamVectorEnv(gym.vector.VectorEnv):
    """N DreamEnvs stepped together in one MDN-RNN forward pass (what RLlib samples from).

    Stepping one dream at a time costs about 1 ms, nearly all of it per-call overhead, so N
    rollouts in one batch cost about as much as one. Gymnasium's next-step autoreset: the step
    after a sub-env ends returns its new first observation with reward 0 and ignores its
    action. All noise comes from one torch generator seeded from the env's np_random, so a
    seed fixes every rollout.
    """

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, run_dir: str, num_envs: int = 8, tau: float = 1.0, max_steps: int = 1000):
        world = WorldModel.load(Path(run_dir))
        self.dream = BatchedDream(world, tau, max_steps)
        self.num_envs = num_envs
        self.single_observation_space, self.single_action_space = dream_spaces(world)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space,
                                                              num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self._gen = torch.Generator()

    def _obs(self) -> np.ndarray:
        return torch.cat([self._z, self._state[0][0]], dim=1).numpy().astype(np.float32)

    def _restart(self, rows: torch.Tensor):
        self.dream.restart(self._z, self._state, rows, self._gen)
        self._t[rows] = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._gen.manual_seed(int(self.np_random.integers(2**31)))
        self._z, self._state = self.dream.reset(self.num_envs, self._gen)
        self._t = torch.zeros(self.num_envs, dtype=torch.long)
        self._ended = torch.zeros(self.num_envs, dtype=torch.bool)
        return self._obs(), {}

    def step(self, actions):
        a = torch.as_tensor(np.asarray(actions, np.float32)).reshape(self.num_envs, -1)
        self._z, self._state, reward, done = self.dream.step(self._z, self._state, a, self._gen)
        self._t += 1
        terminated = done.clone()
        truncated = (self._t >= self.dream.max_steps) & ~done
        restart = self._ended.nonzero().flatten()
        if len(restart):  # these ended last step: this step is their reset
            self._restart(restart)
            reward[restart], terminated[restart], truncated[restart] = 0.0, False, False
        self._ended = terminated | truncated
        return (self._obs(), reward.numpy().astype(np.float32), terminated.numpy(),
                truncated.numpy(), {})
