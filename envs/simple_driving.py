"""SimpleDriving: a procedurally generated pixel driving env rendered with numpy only.

A CarRacing-like task that needs no Box2D and no pygame, and steps ~10x faster,
so data collection for the VAE/MDN-RNN is cheap.

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
        # Offsets of every view pixel from the car, in the car frame: computed once,
        # rotated per step by one cos/sin pair.
        rows, cols = np.mgrid[0:VIEW_ROWS, 0:OBS].astype(np.float32)
        self._fwd = CAR_ROW - rows
        self._right = cols - CAR_COL
        self._sprite, self._sprite_mask = _car_sprite()
        self._obs = np.zeros((OBS, OBS, 3), np.uint8)
        self._raster = None

    # ---- track -------------------------------------------------------------

    def _make_centreline(self) -> np.ndarray:
        """Closed loop r(theta) = R (1 + sum_k a_k sin(k theta + phi_k)), k = 2..5."""
        th = np.linspace(0.0, 2 * np.pi, 4096, endpoint=False)
        for _ in range(100):
            r = np.ones_like(th)
            for k in (2, 3, 4, 5):
                # a_k * k^2 bounds the curvature contribution of each harmonic
                a = self.np_random.uniform(0.0, 1.5 / k**2)
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
        # Shift into raster coords (x = column, y = row) with a grass margin wider
        # than the view radius, so the view never leaves the raster while on track.
        margin = 90
        c = c - c.min(0) + margin
        self._width = int(math.ceil(c[:, 0].max())) + margin
        self._height = int(math.ceil(c[:, 1].max())) + margin
        self._centre, self._tangent = c, t
        self._normal = np.stack([-t[:, 1], t[:, 0]], 1)
        self._n = n
        self._ds = perimeter / n
        self._raster = self._rasterise()
        self._raster_flat = self._raster.reshape(-1, 3)

    def _rasterise(self) -> np.ndarray:
        h, w = self._height, self._width
        yy, xx = np.mgrid[0:h, 0:w]
        checker = ((yy // 16 + xx // 16) % 2).astype(bool)  # grass tiles make motion visible
        img = np.where(checker[..., None], GRASS_B, GRASS_A)
        # Sweep the road cross-section along the centreline at half-unit steps in
        # both directions, so the outer side of bends has no holes.
        c, nrm = self._centre, self._normal
        c_next = np.roll(c, -1, 0)
        sub_c = np.concatenate([c, (c + c_next) / 2])
        sub_n = np.concatenate([nrm, (nrm + np.roll(nrm, -1, 0)) / 2])
        arc = np.concatenate([np.arange(self._n), np.arange(self._n) + 0.5]) * self._ds
        edge = self.half_width + self.kerb_width
        d = np.arange(-edge, edge + 1e-6, 0.5)
        px = sub_c[:, None, :] + d[None, :, None] * sub_n[:, None, :]
        ix = np.clip(np.rint(px[..., 0]).astype(np.intp), 0, w - 1)
        iy = np.clip(np.rint(px[..., 1]).astype(np.intp), 0, h - 1)
        kerb = np.broadcast_to(np.abs(d)[None, :] > self.half_width, ix.shape)
        red = np.broadcast_to(((arc // 6) % 2 == 0)[:, None], ix.shape)
        # Kerbs first, road second: where a bend makes bands overlap, road wins.
        img[iy[kerb & red], ix[kerb & red]] = KERB_RED
        img[iy[kerb & ~red], ix[kerb & ~red]] = KERB_WHITE
        img[iy[~kerb], ix[~kerb]] = ROAD
        return np.ascontiguousarray(img)

    def _locate(self, x: float, y: float) -> tuple[float, float]:
        """Arc position (in centreline samples, unwrapped near the last one) and lateral offset."""
        idx = (self._idx + np.arange(-12, 13)) % self._n
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
        steer, gas, brake = (float(v) for v in np.clip(action, self.action_space.low, self.action_space.high))
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
        return {
            "progress": self._laps,  # signed laps driven this episode
            "off_track": bool(off),
            "speed": self._speed,
            "lateral": self._lateral,
        }

    def _render_obs(self) -> None:
        c, s = math.cos(self._heading), math.sin(self._heading)
        # Car frame -> world: forward = (c, s); right = (-s, c) since y points down.
        wx = self._x + self._fwd * c - self._right * s
        wy = self._y + self._fwd * s + self._right * c
        ix = (wx + 0.5).astype(np.intp)  # round to nearest (coords stay positive)
        iy = (wy + 0.5).astype(np.intp)
        np.clip(ix, 0, self._width - 1, out=ix)
        np.clip(iy, 0, self._height - 1, out=iy)
        obs = self._obs
        obs[:VIEW_ROWS] = self._raster_flat[iy * self._width + ix]
        car = obs[45:52, 30:34]
        car[self._sprite_mask] = self._sprite[self._sprite_mask]
        # Speed bar on the bottom rows: speed is not visible in a single frame otherwise.
        obs[VIEW_ROWS:] = 0
        obs[VIEW_ROWS + 1 : OBS - 1, : int(round(OBS * self._speed / self.max_speed))] = BAR
