"""SimpleDriving: a procedurally generated pixel driving env rendered with numpy only.

A CarRacing-like task that needs no Box2D and no pygame and steps ~100x faster
than CarRacing (~10k steps/s on one core), so data collection is cheap.
Rendering: each track is painted once per reset into a world raster; a step
gathers the 64x64 view with precomputed rotated offsets (nearest neighbour).

World units are raster pixels: one world unit = one observation pixel (the view
is not zoomed), so a 20-unit road is 20 of the 64 pixels wide.

Dynamics (one step = one fixed dt, all speeds in units/step):
    speed   += accel*gas - brake_decel*brake - drag*speed, clipped to [0, max_speed]
    heading += steer * turn_rate * min(speed, grip_speed)
so below `grip_speed` the turn radius is 1/turn_rate (25 units) and above it the
radius grows with speed: tight bends must be taken slowly. Steer +1 turns right.

Reward: 100 * (signed progress along the centreline in laps) - step_cost per step.
Driving backwards gives negative reward. Terminated when the car centre is more
than track_width/2 + off_track_margin from the centreline; truncated at max_steps.
"""

from __future__ import annotations

import functools
import math

import gymnasium as gym
import numpy as np
from gymnasium import spaces

OBS = 64
VIEW_ROWS = 60  # rows 60..63 hold the speed bar
CAR_ROW, CAR_COL = 48.0, 31.5  # car centre in the image: near the bottom, centred
GRASS_A = np.array([102, 204, 102], np.uint8)  # CarRacing's greens
GRASS_B = np.array([102, 230, 102], np.uint8)
ROAD = np.array([107, 107, 107], np.uint8)
KERB_RED = np.array([230, 0, 0], np.uint8)
KERB_WHITE = np.array([255, 255, 255], np.uint8)
CAR_RED = np.array([204, 0, 0], np.uint8)
CAR_DARK = np.array([40, 40, 40], np.uint8)
BAR = np.array([255, 255, 255], np.uint8)


def _pack(rgb) -> np.uint32:
    """RGB -> one uint32 whose bytes in memory are R, G, B, 0."""
    return np.frombuffer(bytes(np.asarray(rgb, np.uint8)) + b"\0", np.uint32)[0]


_GRASS_BLOCK = np.full((32, 32), _pack(GRASS_A), np.uint32)
_GRASS_BLOCK[:16, 16:] = _GRASS_BLOCK[16:, :16] = _pack(GRASS_B)
_PALETTE = np.stack([GRASS_A, KERB_RED, KERB_WHITE, ROAD])  # indexed by track label
HEADING_BINS = 720  # view rotation is quantised to 0.5 deg: < 0.5 px at the view corners
AMP_SCALE = 1.5  # harmonic k has amplitude <= AMP_SCALE / k^2 (relative to the radius)
VIEW_REACH = 60  # > distance from the car to the farthest view pixel (~58)


@functools.lru_cache(maxsize=4)
def _grass(side: int) -> np.ndarray:
    """Checkered grass as (side*side, 3): tiles make motion visible. Read-only."""
    g = np.tile(_GRASS_BLOCK, (side // 32 + 1, side // 32 + 1))[:side, :side]
    g = g.reshape(-1, 1).view(np.uint8)[:, :3].copy()
    g.flags.writeable = False
    return g


@functools.lru_cache(maxsize=4)
def _view_offsets(side: int) -> np.ndarray:
    """Raster index offsets of every view pixel from the car, per heading bin.

    Precomputed once per process (read-only, shared by all envs with the same
    raster side) so rendering a step is one add and one gather.
    """
    rows, cols = np.mgrid[0:VIEW_ROWS, 0:OBS].astype(np.float64)
    fwd, right = (CAR_ROW - rows).ravel(), (cols - CAR_COL).ravel()
    h = np.arange(HEADING_BINS)[:, None] * (2 * np.pi / HEADING_BINS)
    c, s = np.cos(h), np.sin(h)
    # Car frame -> world: forward = (c, s); right = (-s, c) since y points down.
    dx = np.rint(fwd * c - right * s).astype(np.int64)
    dy = np.rint(fwd * s + right * c).astype(np.int64)
    off = (dy * side + dx).astype(np.int32)
    off.flags.writeable = False
    return off


def _car_sprite() -> tuple[np.ndarray, np.ndarray]:
    """A 7x4 red car with a dark windscreen; returns (pixels, mask) for rows 45..51."""
    spr = np.zeros((7, 4, 3), np.uint8)
    spr[:] = CAR_RED
    spr[1, 1:3] = CAR_DARK  # windscreen marks the front
    spr[0, 0] = spr[0, 3] = GRASS_A  # rounded nose; masked out below
    mask = np.ones((7, 4), bool)
    mask[0, 0] = mask[0, 3] = False
    return spr, mask


class SimpleDrivingEnv(gym.Env):
    """Egocentric top-down driving on a random closed track, 64x64x3 uint8 pixels.

    Action: Box([-1, 0, 0], [1, 1, 1]) = [steer, gas, brake], as in CarRacing.

    Args:
        max_steps: episode is truncated after this many steps (default 1000).
        step_cost: reward subtracted every step (default 0.01).
        track_width: road width in world units (= obs pixels) (default 20).
        kerb_width: red/white kerb width on each road edge (default 3).
        off_track_margin: terminate when |lateral offset| > track_width/2 + this
            (default 2, i.e. the car centre is inside the kerb).
        off_track_penalty: reward subtracted on leaving the road (default 0).
        track_radius: mean radius of the loop in world units (default 250,
            giving laps of ~1,600-1,900 units).
        max_speed: speed cap in units/step (default 4).
        accel, brake_decel, drag: longitudinal dynamics (defaults 0.08, 0.2, 0.02;
            full gas tends to max_speed = accel/drag).
        turn_rate: heading change per unit speed at full steer (default 0.04 rad).
        grip_speed: speed above which turning stops getting sharper (default 2).
        render_mode: None or "rgb_array" (returns the 64x64 observation frame).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(
        self,
        max_steps: int = 1000,
        step_cost: float = 0.01,
        track_width: float = 20.0,
        kerb_width: float = 3.0,
        off_track_margin: float = 2.0,
        off_track_penalty: float = 0.0,
        track_radius: float = 250.0,
        max_speed: float = 4.0,
        accel: float = 0.08,
        brake_decel: float = 0.2,
        drag: float = 0.02,
        turn_rate: float = 0.04,
        grip_speed: float = 2.0,
        render_mode: str | None = None,
    ):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"unsupported render_mode {render_mode!r}")
        self.render_mode = render_mode
        self.max_steps = int(max_steps)
        self.step_cost = float(step_cost)
        self.half_width = track_width / 2.0
        self.kerb_width = float(kerb_width)
        self.off_limit = self.half_width + off_track_margin
        self.off_track_penalty = float(off_track_penalty)
        self.track_radius = float(track_radius)
        self.max_speed = float(max_speed)
        self.accel, self.brake_decel, self.drag = float(accel), float(brake_decel), float(drag)
        self.turn_rate, self.grip_speed = float(turn_rate), float(grip_speed)
        # Bends tighter than this would fold the road band over itself or be
        # undriveable at grip speed; such tracks are regenerated.
        self.min_curve_radius = max(35.0, 1.2 * (self.half_width + self.kerb_width))

        self.observation_space = spaces.Box(0, 255, (OBS, OBS, 3), np.uint8)
        self.action_space = spaces.Box(
            np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32), dtype=np.float32
        )
        # Fixed raster side for every seed (the largest possible loop plus a grass
        # margin), so the per-heading view offsets are shared across tracks.
        reach = self.track_radius * (1 + AMP_SCALE * sum(1 / k**2 for k in (2, 3, 4, 5)))
        self._side = 2 * int(math.ceil(reach + self.half_width + self.kerb_width + VIEW_REACH)) + 2
        self._offsets = _view_offsets(self._side)
        self._view = np.empty((VIEW_ROWS * OBS, 3), np.uint8)
        self._sprite, self._sprite_mask = _car_sprite()
        self._obs = np.zeros((OBS, OBS, 3), np.uint8)
        self._raster = None  # (side*side, 3) uint8 world image, built on reset
        # Nearest-centreline search window: wide enough for one step at max_speed.
        reach_idx = int(math.ceil(self.max_speed)) + 8
        self._window = np.arange(-reach_idx, reach_idx + 1)

    # ---- track -------------------------------------------------------------

    def _make_centreline(self) -> np.ndarray:
        """Closed loop r(theta) = R (1 + sum_k a_k sin(k theta + phi_k)), k = 2..5."""
        th = np.linspace(0.0, 2 * np.pi, 4096, endpoint=False)
        for _ in range(100):
            r = np.ones_like(th)
            for k in (2, 3, 4, 5):
                # a_k * k^2 bounds the curvature contribution of each harmonic
                a = self.np_random.uniform(0.0, AMP_SCALE / k**2)
                r += a * np.sin(k * th + self.np_random.uniform(0.0, 2 * np.pi))
            pts = self.track_radius * np.stack([r * np.cos(th), r * np.sin(th)], 1)
            d1 = (np.roll(pts, -1, 0) - np.roll(pts, 1, 0)) / 2
            d2 = np.roll(pts, -1, 0) - 2 * pts + np.roll(pts, 1, 0)
            cross = np.abs(d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0])
            radius = (d1**2).sum(1) ** 1.5 / np.maximum(cross, 1e-12)
            if radius.min() >= self.min_curve_radius:
                return pts
        return pts  # practically unreachable; last try is still a valid loop

    def _build_track(self) -> None:
        pts = self._make_centreline()
        # Resample at ~1 unit spacing so index differences are arc length.
        seg = np.linalg.norm(np.roll(pts, -1, 0) - pts, axis=1)
        cum = np.concatenate([[0.0], np.cumsum(seg)])
        perimeter = cum[-1]
        n = int(round(perimeter))
        s = np.arange(n) * (perimeter / n)
        closed = np.vstack([pts, pts[:1]])
        c = np.stack([np.interp(s, cum, closed[:, 0]), np.interp(s, cum, closed[:, 1])], 1)
        t = np.roll(c, -1, 0) - np.roll(c, 1, 0)
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        c = c + self._side / 2  # raster coords: x = column, y = row
        self._centre, self._tangent = c, t
        self._normal = np.stack([-t[:, 1], t[:, 0]], 1)
        self._n = n
        self._ds = perimeter / n
        self._rasterise()

    def _rasterise(self) -> None:
        """Paint the track into the (side*side, 3) world raster, so a view is one gather."""
        w = self._side
        if self._raster is None:
            self._raster = _grass(w).copy()
            self._label = np.zeros(w * w, np.uint8)
        else:  # undo the previous track: far cheaper than copying the whole raster
            self._raster[self._painted] = _grass(w)[self._painted]
            self._label[self._painted] = 0
        # Sweep the road cross-section along the centreline at half-unit steps in
        # both directions, so the outer side of bends has no holes.
        c, nrm = self._centre.astype(np.float32), self._normal.astype(np.float32)
        sub_c = np.concatenate([c, (c + np.roll(c, -1, 0)) / 2])
        sub_n = np.concatenate([nrm, (nrm + np.roll(nrm, -1, 0)) / 2])
        arc = np.concatenate([np.arange(self._n), np.arange(self._n) + 0.5]) * self._ds
        edge = self.half_width + self.kerb_width
        d = np.arange(-edge, edge + 1e-6, 0.5, dtype=np.float32)
        ix = (sub_c[:, None, 0] + d * sub_n[:, None, 0] + 0.5).astype(np.intp)
        iy = (sub_c[:, None, 1] + d * sub_n[:, None, 1] + 0.5).astype(np.intp)
        lin = iy * w + ix  # in range: the raster side covers the largest loop
        kerb = np.abs(d) > self.half_width
        red = (arc // 8) % 2 == 0
        # Label samples (1-byte writes are cheap), kerbs first so road wins where a
        # bend makes bands overlap; then colour each painted pixel once.
        label = self._label
        label[lin[red][:, kerb]] = 1
        label[lin[~red][:, kerb]] = 2
        label[lin[:, ~kerb]] = 3
        self._painted = np.flatnonzero(label)
        self._raster[self._painted] = _PALETTE[label[self._painted]]

    def _locate(self, x: float, y: float) -> tuple[float, float]:
        """Arc position (in centreline samples, unwrapped near the last one) and lateral offset."""
        idx = (self._idx + self._window) % self._n
        dx = x - self._centre[idx, 0]
        dy = y - self._centre[idx, 1]
        k = int(np.argmin(dx * dx + dy * dy))
        j = int(idx[k])
        tx, ty = self._tangent[j]
        nx, ny = self._normal[j]
        along = (dx[k] * tx + dy[k] * ty) / self._ds
        lateral = dx[k] * nx + dy[k] * ny
        self._idx = j
        return j + along, float(lateral)

    # ---- pickling: drop the big derived arrays (~15 MB), rebuild on load ------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in ("_offsets", "_raster", "_label", "_painted"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._offsets = _view_offsets(self._side)
        self._raster = None
        if "_centre" in state:  # a track was built: repaint it (no randomness used)
            self._rasterise()

    # ---- gym API -----------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._build_track()
        self._idx = int(self.np_random.integers(self._n))
        self._x, self._y = map(float, self._centre[self._idx])
        tx, ty = self._tangent[self._idx]
        self._heading = math.atan2(ty, tx)
        self._speed = 0.0
        self._steps = 0
        self._s, self._lateral = self._locate(self._x, self._y)
        self._laps = 0.0
        self._render_obs()
        return self._obs.copy(), self._info(False)

    def step(self, action):
        if self._raster is None:
            raise RuntimeError("call reset() before step()")
        a = np.asarray(action, dtype=np.float64).reshape(3).tolist()  # python floats: fast scalar math
        steer = min(max(a[0], -1.0), 1.0)
        gas = min(max(a[1], 0.0), 1.0)
        brake = min(max(a[2], 0.0), 1.0)
        v = self._speed
        v += self.accel * gas - self.brake_decel * brake - self.drag * v
        v = min(max(v, 0.0), self.max_speed)
        self._heading += steer * self.turn_rate * min(v, self.grip_speed)
        self._x += v * math.cos(self._heading)
        self._y += v * math.sin(self._heading)
        self._speed = v
        self._steps += 1

        s, self._lateral = self._locate(self._x, self._y)
        ds = (s - self._s + self._n / 2) % self._n - self._n / 2  # wrap across the start
        self._s = s
        self._laps += ds / self._n
        off = abs(self._lateral) > self.off_limit
        reward = 100.0 * ds / self._n - self.step_cost - (self.off_track_penalty if off else 0.0)
        truncated = self._steps >= self.max_steps and not off
        self._render_obs()
        return self._obs.copy(), float(reward), off, truncated, self._info(off)

    def render(self):
        if self.render_mode == "rgb_array":
            return self._obs.copy()
        return None

    def _info(self, off: bool) -> dict:
        tx, ty = self._tangent[self._idx]
        err = (self._heading - math.atan2(ty, tx) + math.pi) % (2 * math.pi) - math.pi
        return {
            "progress": float(self._laps),  # signed laps driven this episode
            "off_track": bool(off),
            "speed": self._speed,
            "lateral": self._lateral,  # signed offset from the centreline, + = right
            "heading_error": err,  # car heading minus track direction, + = right
        }

    @property
    def centreline(self) -> np.ndarray:
        """Track centreline of the current episode, (N, 2) raster (x, y), ~1 unit apart."""
        return self._centre.copy()

    def _render_obs(self) -> None:
        b = int(round(self._heading * (HEADING_BINS / (2 * math.pi)))) % HEADING_BINS
        # Clamp the view centre so the gather stays inside the raster even after
        # the car has left the track (only reachable past termination).
        lo, hi = VIEW_REACH, self._side - 1 - VIEW_REACH
        cx = min(max(int(round(self._x)), lo), hi)
        cy = min(max(int(round(self._y)), lo), hi)
        np.take(self._raster, self._offsets[b] + (cy * self._side + cx), axis=0, out=self._view)
        obs = self._obs
        obs[:VIEW_ROWS] = self._view.reshape(VIEW_ROWS, OBS, 3)
        car = obs[45:52, 30:34]
        car[self._sprite_mask] = self._sprite[self._sprite_mask]
        # Speed bar on the bottom rows: speed is not visible in a single frame otherwise.
        obs[VIEW_ROWS:] = 0
        obs[VIEW_ROWS + 1 : OBS - 1, : int(round(OBS * self._speed / self.max_speed))] = BAR
