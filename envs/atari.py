"""Atari through ale-py (ALE v5: frameskip 4, sticky actions 0.25), frames resized to 64x64."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.frames import resize64


class Atari64(gym.ObservationWrapper):
    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = spaces.Box(0, 255, (64, 64, 3), np.uint8)

    def observation(self, observation):
        return resize64(observation)


def make_atari(game: str, **kwargs) -> gym.Env:
    from ale_py import AtariEnv  # the optional extra; the registry reports its absence

    settings = {"frameskip": 4, "repeat_action_probability": 0.25, **kwargs}  # ALE v5
    return Atari64(AtariEnv(game=game.lower(), obs_type="rgb", **settings))
