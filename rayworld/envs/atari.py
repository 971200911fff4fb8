"""Atari through ale-py (ALE v5: frameskip 4, sticky actions 0.25), frames resized to 64x64.

`fire_on_life` (Breakout's preset turns it on): the env presses FIRE itself at the start and
after each lost life. Breakout's ball waits for FIRE; a controller evolved in the dream never
learns that, because the dream cannot show it a ball that never comes. The FIRE step's reward
is kept.

`dilate` (pixels, default 0): every pixel of the raw 210x160 frame takes the brightest value
within that many pixels before the resize. Breakout's ball is 2x4 raw pixels, under one 64x64
cell: a VAE drops it, or draws it as a smear along its path. Dilated by 2, it covers about 2x2
cells and the paddle 8x2, so both are worth coding in z. The agent sees the same frames in the
real env and in the data.

`end_on_life_loss` (default false): a lost life ends the episode (terminated), as in DQN's
training episodes. Collected data then shows the world model where a life ends, so the
dream's done head can charge a controller for losing the ball. Score the whole game with
`evaluate.env_kwargs: {end_on_life_loss: false}`.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rayworld.envs.frames import resize64
from rayworld.envs.registry import EnvArgumentError


def dilate(frame: np.ndarray, d: int) -> np.ndarray:
    """The max over a (2d+1)x(2d+1) window around each pixel (separable: rows, then columns).
    PIL's MaxFilter and numpy's sliding_window_view give the same frames about 6x slower, and
    this runs on every env step."""
    if d <= 0:
        return frame
    out = frame
    for axis in (0, 1):
        pad = [(0, 0)] * frame.ndim
        pad[axis] = (d, d)
        padded = np.pad(out, pad)
        n = out.shape[axis]
        out = np.max([padded.take(range(i, i + n), axis=axis) for i in range(2 * d + 1)], axis=0)
    return out


class Atari64(gym.Wrapper):
    def __init__(self, env: gym.Env, fire_on_life: bool = False, dilate: int = 0,
                 end_on_life_loss: bool = False):
        super().__init__(env)
        if not isinstance(end_on_life_loss, bool):
            raise EnvArgumentError(f"env.kwargs.end_on_life_loss: expected true or false, got "
                                   f"{end_on_life_loss!r}")
        self.end_on_life_loss = end_on_life_loss
        if not isinstance(dilate, int) or isinstance(dilate, bool) or not 0 <= dilate <= 8:
            raise EnvArgumentError(f"env.kwargs.dilate: expected an integer number of raw "
                                   f"pixels from 0 to 8, got {dilate!r}")
        self.dilate = dilate
        self.observation_space = spaces.Box(0, 255, (64, 64, 3), np.uint8)
        meanings = env.unwrapped.get_action_meanings()
        if fire_on_life and "FIRE" not in meanings:
            raise EnvArgumentError(f"env.kwargs.fire_on_life: this game has no FIRE action "
                                   f"({', '.join(meanings)})")
        self.fire = meanings.index("FIRE") if fire_on_life else None
        self.lives = 0

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.lives = info.get("lives", 0)
        if self.fire is not None:
            obs, _, terminated, truncated, info = self.env.step(self.fire)
            if terminated or truncated:  # not in Breakout; keep reset's contract anyway
                obs, info = self.env.reset(**kwargs)
        return self.frame(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        lives = info.get("lives", self.lives)
        if self.end_on_life_loss and lives < self.lives:
            terminated = True
        if self.fire is not None and lives < self.lives and not (terminated or truncated):
            obs, more, terminated, truncated, info = self.env.step(self.fire)
            reward += more
        self.lives = lives
        return self.frame(obs), reward, terminated, truncated, info

    def frame(self, obs):
        return resize64(dilate(obs, self.dilate))


def make_atari(game: str, fire_on_life: bool = False, dilate: int = 0,
               end_on_life_loss: bool = False, **kwargs) -> gym.Env:
    from ale_py import AtariEnv  # the optional extra; the registry reports its absence

    settings = {"frameskip": 4, "repeat_action_probability": 0.25, **kwargs}  # ALE v5
    return Atari64(AtariEnv(game=game.lower(), obs_type="rgb", **settings), fire_on_life, dilate,
                   end_on_life_loss)
