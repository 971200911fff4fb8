"""Atari through ale-py (ALE v5: frameskip 4, sticky actions 0.25), frames resized to 64x64.

`fire_on_life` (Breakout's preset turns it on): the env presses FIRE itself at the start and
after each lost life. Breakout's ball waits for FIRE; a controller evolved in the dream never
learns that, because the dream cannot show it a ball that never comes. The FIRE step's reward
is kept.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.frames import resize64
from envs.registry import EnvArgumentError


class Atari64(gym.Wrapper):
    def __init__(self, env: gym.Env, fire_on_life: bool = False):
        super().__init__(env)
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
        return resize64(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        lives = info.get("lives", self.lives)
        if self.fire is not None and lives < self.lives and not (terminated or truncated):
            obs, more, terminated, truncated, info = self.env.step(self.fire)
            reward += more
        self.lives = lives
        return resize64(obs), reward, terminated, truncated, info


def make_atari(game: str, fire_on_life: bool = False, **kwargs) -> gym.Env:
    from ale_py import AtariEnv  # the optional extra; the registry reports its absence

    settings = {"frameskip": 4, "repeat_action_probability": 0.25, **kwargs}  # ALE v5
    return Atari64(AtariEnv(game=game.lower(), obs_type="rgb", **settings), fire_on_life)
