"""Every policy that drives a real env: collection, evaluation and evolution all take theirs here.

- `random`: uniform actions.
- `brownian`: a random walk in action space (discrete: repeat the last action with p = 0.9).
- `drive`: for [steer, gas, brake] cars: steering as a mean-reverting walk around straight
  ahead, gas as a walk biased towards `collect.gas`, short brake taps now and then. Uniform
  gas and brake leave a car standing (brake outweighs gas), so its data never shows speed.
- `track`: for car envs with a grey road (CarRacing, SimpleDriving): a scripted driver that
  steers towards the road it sees ahead in the frame, with per-episode skill and speed, noise
  on the wheel, brake holds, bursts of heavy gas, and lapses where it lets go and leaves the
  road. Like Dropout's Dream Land's expert data, it shows the model the track being driven;
  the controller still learns only in the dream.
- `gait`: for bodies with joints (DMC locomotion): every action dimension follows a sine wave
  with the episode's own period, amplitude, phase and offset, plus noise, and now and then the
  episode switches to a new gait. Rhythm moves a body where a random walk only twitches it, so
  the data shows running at many speeds, and falling over, for the model to learn from.
- `paddle`: for Breakout: moves the paddle to where the falling ball will land, found from the
  ball's positions in the last frames, with each episode's own aim and lapse rate. A
  random walk returns the ball about once a life, so its data barely shows a hit being paid.
- `random_controller`: the paper's: a controller on [z, h] with small random weights, drawn per
  episode, acting through the run's VAE and MDN-RNN.
- `controller`: the evolved controller, plus Gaussian exploration noise (`collect.noise`).

`Agent` is the whole World Models agent on real frames: the VAE encodes each frame to z, the
policy acts on [z, h], and the MDN-RNN advances h with (z, action).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

CONTROLLER = "controller.pt"
KINDS = ("random", "brownian", "drive", "track", "gait", "paddle", "random_controller",
         "controller")
MODEL_KINDS = ("random_controller", "controller")  # these need a trained VAE and MDN-RNN


class RandomPolicy:
    """Uniform random actions from the action space."""

    def __init__(self, space, rng: np.random.Generator):
        self.space, self.rng = space, rng

    def __call__(self, obs):
        if hasattr(self.space, "n"):
            return int(self.rng.integers(self.space.n))
        return self.rng.uniform(self.space.low, self.space.high).astype(np.float32)


class BrownianPolicy:
    """A temporally correlated random walk in action space (smooth, so the car actually moves).

    Discrete spaces repeat the last action with a probability that plays the same role.
    """

    def __init__(self, space, rng: np.random.Generator, sigma: float, dt: float = 1 / 50):
        self.space, self.rng, self.sigma, self.dt = space, rng, sigma, dt
        self.action = None

    def __call__(self, obs):
        if hasattr(self.space, "n"):
            if self.action is None or self.rng.random() > 0.9:
                self.action = int(self.rng.integers(self.space.n))
            return self.action
        low, high = self.space.low, self.space.high
        if self.action is None:
            self.action = self.rng.uniform(low, high)
        else:
            step = self.sigma * np.sqrt(self.dt) * self.rng.standard_normal(len(low))
            self.action = np.clip(self.action + step * (high - low), low, high)
        return self.action.astype(np.float32)


def is_car(space) -> bool:
    """[steer, gas, brake] in [-1, 1] x [0, 1] x [0, 1]: CarRacing, SimpleDriving, CARLA."""
    return (not hasattr(space, "n") and space.shape == (3,) and
            np.allclose(space.low, [-1, 0, 0]) and np.allclose(space.high, [1, 1, 1]))


class BrakeHolds:
    """Now and then (p = rate per step) the brake is held for 5 to `longest` steps at a random
    strength in [0.2, 1]; the brake value for this step."""

    def __init__(self, rate: float, longest: int):
        self.rate, self.longest = rate, longest
        self.brake, self.hold = 0.0, 0

    def __call__(self, r: np.random.Generator) -> float:
        if self.hold == 0 and r.random() < self.rate:
            self.brake, self.hold = float(r.uniform(0.2, 1.0)), int(r.integers(5, self.longest + 1))
        self.hold = max(self.hold - 1, 0)
        return self.brake if self.hold else 0.0


class DrivePolicy:
    """Gas-biased driving noise for car envs (see the module docstring).

    Braking comes in holds of 5 to 40 steps at a random strength, with the gas left as it is:
    a model that never saw a car stop under brake lets the controller brake for free.
    """

    def __init__(self, space, rng: np.random.Generator, sigma: float, gas: float,
                 dt: float = 1 / 50, brake_rate: float = 0.01):
        if not is_car(space):
            raise ValueError(f"collect.policy drive needs a [steer, gas, brake] action space, "
                             f"this env has {space}; use brownian")
        self.rng, self.gas_mean = rng, gas
        self.step_std = sigma * np.sqrt(dt)
        self.steer, self.gas = 0.0, float(rng.uniform(gas / 2, 1.0))
        self.brakes = BrakeHolds(brake_rate, longest=40)

    def __call__(self, obs):
        r = self.rng
        # steering reverts to straight ahead within ~20 steps, so cars go somewhere
        self.steer = float(np.clip(0.95 * self.steer + 2 * self.step_std * r.standard_normal(),
                                   -1, 1))
        self.gas = float(np.clip(self.gas + 0.05 * (self.gas_mean - self.gas) +
                                 self.step_std * r.standard_normal(), 0, 1))
        return np.array([self.steer, self.gas, self.brakes(r)], np.float32)


def road_mask(frame: np.ndarray) -> np.ndarray:
    """Grey asphalt: R, G and B within 15 of each other, at 81..139 (CarRacing's 100-107)."""
    o = frame.astype(np.int16)
    r, g, b = o[..., 0], o[..., 1], o[..., 2]
    return (np.abs(r - g) < 15) & (np.abs(g - b) < 15) & (r > 80) & (r < 140)


class TrackPolicy:
    """A road follower on 64x64 frames with the car at the centre column (see the module
    docstring). Each episode draws its own gains, look-ahead, speed and noise level, so the
    data holds good driving, sloppy driving, bursts of full gas, spins and recoveries. A
    quarter of the episodes hold heavy gas throughout: a dream controller that floors it
    must meet, in the model, the bend where that ends."""

    CAR_COL = 31.5

    def __init__(self, space, rng: np.random.Generator, sigma: float, gas: float,
                 lapse_rate: float = 0.002, brake_rate: float = 0.005, burst_rate: float = 0.005,
                 reckless: float = 0.25, straight: float = 0.0):
        if not is_car(space):
            raise ValueError(f"collect.policy track needs a [steer, gas, brake] action space, "
                             f"this env has {space}; use brownian")
        self.rng, self.lapse_rate, self.straight = rng, lapse_rate, straight
        self.brakes = BrakeHolds(brake_rate, longest=30)
        self.burst_rate, self.burst, self.burst_gas = burst_rate, 0, 0.0
        self.kp = rng.uniform(1.5, 3.0)
        top = int(rng.integers(24, 35))
        self.rows = slice(top, top + 16)
        self.gas_mean = float(np.clip(gas * rng.uniform(0.5, 1.5), 0, 1))
        if rng.random() < reckless:  # held heavy gas: the data shows a car too fast to steer
            self.gas_mean = float(rng.uniform(0.4, 1.0))
        self.sigma = sigma * rng.uniform(0, 1)
        self.err = self.wobble = 0.0
        self.gas = self.gas_mean
        self.lapse, self.lapse_steer = 0, 0.0

    def __call__(self, obs):
        r = self.rng
        cols = np.nonzero(road_mask(np.asarray(obs)[self.rows]))[1]
        err = (cols.mean() - self.CAR_COL) / 32 if len(cols) else self.err
        steer = self.kp * err + (err - self.err)  # PD: the derivative damps the weave
        self.err = err
        self.wobble = 0.9 * self.wobble + self.sigma * 0.3 * r.standard_normal()
        if self.lapse == 0 and r.random() < self.lapse_rate:
            if self.straight and r.random() < self.straight:  # long enough to meet a bend
                self.lapse, self.lapse_steer = int(r.integers(30, 151)), 0.0
            else:
                self.lapse, self.lapse_steer = int(r.integers(10, 61)), float(r.uniform(-1, 1))
        if self.lapse:
            self.lapse -= 1
            steer = self.lapse_steer
        self.gas = float(np.clip(self.gas + 0.05 * (self.gas_mean - self.gas) +
                                 0.02 * r.standard_normal(), 0, 1))
        brake = self.brakes(r)
        steer = float(np.clip(steer + self.wobble, -1, 1))
        gas = self.gas if abs(steer) < 0.5 else 0.0  # ease off through sharp bends
        # bursts of heavy gas: without them the data never shows what speed does in a bend,
        # and a dream controller floors it where the model can only guess
        if self.burst == 0 and r.random() < self.burst_rate:
            self.burst, self.burst_gas = int(r.integers(20, 81)), float(r.uniform(0.3, 1.0))
        if self.burst:
            self.burst -= 1
            gas = self.burst_gas
        return np.array([steer, gas, brake], np.float32)


class GaitPolicy:
    """Rhythmic actions for jointed bodies (see the module docstring). Periods are in env steps
    (12 to 50: 0.25 to 1 s at DMC's 50 steps a second), the noise std is sigma / 5, and with
    probability `switch` per step the episode draws a new gait."""

    def __init__(self, space, rng: np.random.Generator, sigma: float, switch: float = 0.005):
        if hasattr(space, "n"):
            raise ValueError(f"collect.policy gait needs a continuous action space, this env has "
                             f"{space}; use brownian")
        self.rng, self.switch, self.noise = rng, switch, sigma / 5
        self.low, self.high = space.low.astype(np.float32), space.high.astype(np.float32)
        self.mid, self.half = (self.high + self.low) / 2, (self.high - self.low) / 2
        self.t = 0
        self._draw()

    def _draw(self):
        r, n = self.rng, len(self.low)
        self.omega = 2 * np.pi / r.uniform(12, 50)
        self.amp = r.uniform(0.3, 1.0, n)
        self.phase = r.uniform(0, 2 * np.pi, n)
        self.offset = r.uniform(-0.3, 0.3, n)

    def __call__(self, obs):
        if self.rng.random() < self.switch:
            self._draw()
        wave = self.amp * np.sin(self.omega * self.t + self.phase) + self.offset
        self.t += 1
        a = self.mid + self.half * (wave + self.noise * self.rng.standard_normal(len(wave)))
        return np.clip(a, self.low, self.high).astype(np.float32)


class PaddlePolicy:
    """Breakout on 64x64 frames (see the module docstring): the ball below the bricks (rows
    29-55) and the paddle (read at rows 57-59, below a dilated ball about to hit it), inside
    the side walls. The walls are found in each frame (the inner edge of the lit columns at a
    row below the bricks), so frames dilated by `env.kwargs.dilate` work too. When the ball
    falls, the aim is where its straight line from two frames back meets the paddle row,
    folded at the walls. Each episode draws an aim offset (the paddle's edge sends the ball at
    an angle) and a lapse rate: on a lapse step it acts like `brownian`."""

    PADDLE_ROW, WALL_ROW = 57, 40
    PLAY, PADDLE = slice(29, 56), slice(57, 60)  # rows: below the bricks; the paddle's
    NOOP, RIGHT, LEFT = 0, 2, 3  # Breakout's minimal action set: NOOP, FIRE, RIGHT, LEFT

    def __init__(self, space, rng: np.random.Generator):
        if getattr(space, "n", None) != 4:
            raise ValueError(f"collect.policy paddle needs Breakout's 4 actions (NOOP, FIRE, "
                             f"RIGHT, LEFT), this env has {space}; use brownian")
        self.rng, self.walk = rng, BrownianPolicy(space, rng, 0.0)
        self.offset = rng.uniform(-3, 3)
        self.lapse = rng.uniform(0, 0.4)
        self.ball = self.before = None
        self.walls = (3, 60)  # the first and one past the last column inside the walls

    def locate(self, obs):
        """(paddle column, ball (row, column)), either None when not in the frame."""
        lit = np.asarray(obs).astype(np.int16).sum(-1) > 60
        row = lit[self.WALL_ROW]
        if row[0] and row[-1]:  # both walls in view: their inner edges
            self.walls = (int(np.argmin(row)), len(row) - int(np.argmin(row[::-1])))
        lo, hi = self.walls
        lit = lit[:, lo:hi]
        paddle = np.nonzero(lit[self.PADDLE].any(0))[0]
        ball = np.argwhere(lit[self.PLAY])
        return (paddle.mean() + lo if len(paddle) else None,
                ball.mean(0) + (self.PLAY.start, lo) if len(ball) else None)

    def landing(self, ball) -> float:
        aim = ball[1]
        if self.ball is not None and ball[0] > self.ball[0]:  # falling
            # over two steps when the ball fell through both: a whole-cell centroid is too
            # coarse to give the slope from one
            last = self.before if self.before is not None and self.before[0] < self.ball[0] \
                else self.ball
            vy, vx = ball - last
            aim = ball[1] + vx * (self.PADDLE_ROW - ball[0]) / vy
            lo, hi = float(self.walls[0]), float(self.walls[1] - 1)
            while not lo <= aim <= hi:  # fold at the walls
                aim = 2 * lo - aim if aim < lo else 2 * hi - aim
        return aim + self.offset

    def __call__(self, obs):
        paddle, ball = self.locate(obs)
        walk = self.walk(obs)  # advanced every step, so a lapse continues its own walk
        aim = self.landing(ball) if ball is not None else None
        self.ball, self.before = ball, self.ball
        if paddle is None or aim is None or self.rng.random() < self.lapse:
            return walk
        return self.RIGHT if aim > paddle + 1 else self.LEFT if aim < paddle - 1 else self.NOOP


def make_policy(kind: str, space, seed: int, sigma: float, gas: float = 0.7,
                lapses: float = 0.002, straight_lapses: float = 0.0):
    """A model-free collection policy, seeded per episode (lapses: track's, see
    collect.lapses)."""
    rng = np.random.default_rng([seed, 7])
    if kind == "random":
        return RandomPolicy(space, rng)
    if kind == "brownian":
        return BrownianPolicy(space, rng, sigma)
    if kind == "drive":
        return DrivePolicy(space, rng, sigma, gas)
    if kind == "track":
        return TrackPolicy(space, rng, sigma, gas, lapses, straight=straight_lapses)
    if kind == "gait":
        return GaitPolicy(space, rng, sigma)
    if kind == "paddle":
        return PaddlePolicy(space, rng)
    raise ValueError(f"unknown policy {kind!r}; known: {', '.join(KINDS)}")


def run_episode(env, policy, seed: int, max_steps: int):
    """Step one episode; returns arrays (obs, actions, rewards, terminated, truncated)."""
    obs, _ = env.reset(seed=seed)
    frames, actions, rewards, terms, truncs = [], [], [], [], []
    for t in range(max_steps):
        action = policy(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        truncated = truncated or t == max_steps - 1
        frames.append(obs)
        actions.append(np.atleast_1d(np.asarray(action, np.float32)))
        rewards.append(reward)
        terms.append(terminated)
        truncs.append(truncated and not terminated)
        obs = next_obs
        if terminated or truncated:
            break
    return (np.stack(frames), np.stack(actions), np.asarray(rewards, np.float32),
            np.asarray(terms), np.asarray(truncs))


# ---------------------------------------------------------------- the World Models agent

def make_controller(cfg, latent: int, hidden: int, action_dim: int, discrete: bool):
    from rayworld.models.controller import Controller

    return Controller(latent=latent, hidden=hidden if cfg.controller.inputs == "zh" else 0,
                      action_dim=action_dim, kind=cfg.controller.kind,
                      mlp_hidden=tuple(cfg.controller.mlp_hidden), discrete=discrete)


def load_controller_params(run_dir: Path) -> tuple[np.ndarray, int]:
    from rayworld.train.common import load_model_file

    path = Path(run_dir) / "checkpoints" / CONTROLLER
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no controller yet ({path} is missing): run "
                                f"`rayworld evolve --out {run_dir}` first")
    state = load_model_file(path, "evolve")
    return state["params"].double().numpy(), int(state["generation"])


class Agent:
    """The World Models agent on real frames: VAE -> z, controller on [z, h], MDN-RNN -> next h.

    Callable as a collection policy: `agent(obs)` returns the env action. Call `reset()` at
    the start of every episode. `policy` replaces the evolved controller with any callable
    on (z [B, Z], h [B, H]) that returns actions [B, A] (discrete: indices [B]), e.g. an
    RLlib policy (rayworld.rllib.MeanActionPolicy).

    `noise` > 0 adds Gaussian exploration noise to continuous actions (clipped to the action
    space) or, for discrete ones, takes a uniform action with probability `noise`.
    `z_sample`: encode frames as a sample of the VAE posterior instead of its mean, matching
    the latents the MDN-RNN trained and dreams on (`evaluate.z: sample`).
    """

    def __init__(self, run_dir, cfg, params=None, policy=None, noise: float = 0.0,
                 z_sample: bool = False, seed: int = 0):
        from rayworld.dream import WorldModel
        from rayworld.encode import load_vae

        run = Path(run_dir)
        self.vae = load_vae(run / "checkpoints" / "vae.pt")
        self.world = WorldModel.load(run)
        if self.vae.latent != self.world.latent:
            raise ValueError(f"{run / 'checkpoints' / 'vae.pt'} has latent {self.vae.latent} but "
                             f"checkpoints/mdn.pt was trained on latent {self.world.latent}; "
                             "re-run encode and train-mdn (or use another --out)")
        w = self.world
        if cfg.controller.kind == "mpc":  # no weights: it plans in the dream at every step
            from rayworld.plan import Planner

            self.controller = Planner(w, cfg.plan, seed)
        else:
            n_out = w.action_n if w.discrete else w.action_dim
            self.controller = make_controller(cfg, w.latent, w.hidden, n_out, w.discrete).eval()
        self.policy = self.controller
        self.noise, self.z_sample = float(noise), bool(z_sample)
        if not w.discrete:  # exploration clips to these; computed once, not every step
            from rayworld.dream import action_bounds

            self.low, self.high = map(torch.from_numpy, action_bounds(w.action_dim))
        self.gen = torch.Generator().manual_seed(seed)
        if params is not None:
            self.set_params(params)
        if policy is not None:
            self.set_policy(policy)
        self.reset()

    def set_params(self, params):
        """Act with the evolved controller, with these flat parameters (a planner has none)."""
        if hasattr(self.controller, "set_flat"):
            self.controller.set_flat(np.array(params))  # Ray hands over read-only arrays
        elif np.size(params):
            raise ValueError(f"a planner (controller.kind mpc) has no parameters, got "
                             f"{np.size(params)}")
        self.policy = self.controller

    def set_policy(self, policy):
        """Act with any policy on (z, h) instead of the controller."""
        self.policy = policy

    def reseed(self, seed: int):
        """The agent's own noise (exploration, sampled z, a planner's samples) for the next
        episode."""
        self.gen.manual_seed(int(seed))
        if hasattr(self.policy, "reseed"):
            self.policy.reseed(seed)

    def reset(self):
        self.state = self.world.mdn.initial_state(1)
        if hasattr(self.policy, "reset"):
            self.policy.reset()

    def decide(self, z: torch.Tensor, state) -> torch.Tensor:
        """The policy's action on (z, the MDN-RNN state): a planner reads the whole state,
        any other policy reads h."""
        if getattr(self.policy, "stateful", False):
            return self.policy.act(z, state)
        return self.policy(z, state[0][0])

    @torch.no_grad()
    def encode(self, obs) -> torch.Tensor:
        """One HxWxC uint8 frame -> z [1, Z]: the VAE's mean, or a sample with z_sample."""
        x = torch.tensor(np.asarray(obs)).permute(2, 0, 1)[None].float().div_(255.0)  # copies
        mu, logvar = self.vae.encode(x)
        if not self.z_sample:
            return mu
        return mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=self.gen)

    def _explore(self, a: torch.Tensor) -> torch.Tensor:
        if self.world.discrete:
            if torch.rand(1, generator=self.gen).item() < self.noise:
                return torch.randint(self.world.action_n, a.shape, generator=self.gen)
            return a
        a = a + self.noise * torch.randn(a.shape, generator=self.gen)
        return torch.maximum(torch.minimum(a, self.high), self.low)

    @torch.no_grad()
    def __call__(self, obs):
        z = self.encode(obs)
        a = self.decide(z, self.state)
        if self.noise > 0:
            a = self._explore(a)
        _, self.state = self.world.mdn.step(z, a.float().reshape(1, -1), self.state)
        return int(a[0]) if self.world.discrete else a[0].numpy()


class RandomControllerAgent(Agent):
    """The paper's exploration: a controller with small random weights, new every episode."""

    def __init__(self, run_dir, cfg, scale: float = 0.1, **kwargs):
        super().__init__(run_dir, cfg, **kwargs)
        self.scale = scale

    def reseed(self, seed: int):
        super().reseed(seed)
        n = self.controller.num_params
        self.set_params((self.scale * torch.randn(n, generator=self.gen)).double().numpy())


def check_world_model(run_dir: Path):
    """Read vae.pt and mdn.pt once in the driver, so a damaged one is one line naming the file
    and its stage, not a traceback from every actor that loads it."""
    from rayworld.train.common import load_model_file

    ckpt = Path(run_dir) / "checkpoints"
    load_model_file(ckpt / "vae.pt", "train-vae")
    load_model_file(ckpt / "mdn.pt", "train-mdn")


def require_world_model(kind: str, run_dir: Path, cfg):
    """One line, before any actor starts, when a policy in MODEL_KINDS has nothing to act with."""
    planner = cfg.controller.kind == "mpc"  # plans with the world model alone
    needs = ("vae.pt", "mdn.pt") + ((CONTROLLER,) if kind == "controller" and not planner else ())
    missing = [p for p in needs if not (Path(run_dir) / "checkpoints" / p).exists()]
    if missing:
        raise FileNotFoundError(f"collect.policy {kind} acts through the world model, and "
                                f"{Path(run_dir) / 'checkpoints'} has no {', '.join(missing)}: "
                                "run train-vae, encode, train-mdn (and evolve) first, or "
                                "collect with drive or brownian")
    check_world_model(run_dir)
    if kind == "controller" and not planner:
        load_controller_params(run_dir)


def model_policy(kind: str, run_dir: Path, cfg, noise: float = 0.0) -> Agent:
    """A collection policy that acts through the run's world model (kinds in MODEL_KINDS)."""
    require_world_model(kind, run_dir, cfg)
    if kind == "random_controller":
        return RandomControllerAgent(run_dir, cfg)
    if cfg.controller.kind == "mpc":  # the planner explores with the same noise
        return Agent(run_dir, cfg, noise=noise)
    return Agent(run_dir, cfg, load_controller_params(run_dir)[0], noise=noise)
