"""Atari through ale-py (ALE v5: frameskip 4, sticky actions 0.25), frames resized to 64x64."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image


class Atari64(gym.ObservationWrapper):
    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = spaces.Box(0, 255, (64, 64, 3), np.uint8)

    def observation(self, observation):
        img = Image.fromarray(observation).resize((64, 64), Image.Resampling.BOX)
        return np.asarray(img, dtype=np.uint8)


def make_atari(game: str, **kwargs) -> gym.Env:
    import ale_py  # the optional extra; the registry turns its absence into a clear error

    gym.register_envs(ale_py)
    return Atari64(gym.make(f"ALE/{game}-v5", **kwargs).unwrapped)
