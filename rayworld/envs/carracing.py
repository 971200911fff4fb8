"""CarRacing-v3 at 64x64.

The 96x96 frame's bottom 12 rows (84..95) are the dashboard; like the World Models paper we
crop them away, keeping rows 0..83 (84x96), then resize to 64x64 with Pillow's BOX filter
(an area average, so thin kerbs blur instead of aliasing). The aspect ratio changes slightly
(84x96 -> 64x64); the VAE does not care.
"""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rayworld.envs.frames import resize64

CROP_ROWS = 84


def to_64(frame: np.ndarray) -> np.ndarray:
    return resize64(frame[:CROP_ROWS])


class CarRacing64(gym.ObservationWrapper):
    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = spaces.Box(0, 255, (64, 64, 3), np.uint8)

    def observation(self, observation):
        return to_64(observation)


def make_carracing(**kwargs) -> gym.Env:
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # headless
    from gymnasium.envs.box2d.car_racing import CarRacing

    return CarRacing64(CarRacing(continuous=True, **kwargs))
