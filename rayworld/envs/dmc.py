"""DeepMind Control Suite from pixels: 64x64 renders of a dm_control task as a gymnasium env.

MuJoCo renders offscreen through `MUJOCO_GL`. We default it to `egl`: on a GPU node that is the
GPU's EGL; on a CPU-only machine Mesa's EGL (llvmpipe, software) serves it, about 40 ms a frame
on one core here. `osmesa` also works where libOSMesa is installed.

Each env step repeats the action `action_repeat` times (the usual 2 for DMC from pixels) and
sums the rewards. DMC tasks never fail: an episode ends by time limit (1000 physics steps), which
is a truncation, not a terminal state.
"""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rayworld.envs.frames import SIZE
from rayworld.envs.registry import EnvArgumentError, check, is_int


def load_task(domain: str, task: str, seed: int | None):
    """The dm_control task, with MUJOCO_GL set first: whichever GL backend dm_control meets
    first stays for the whole process."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    from dm_control import suite

    if (domain, task) not in suite.ALL_TASKS:
        known = ", ".join(f"{d}-{t}" for d, t in suite.ALL_TASKS)
        raise EnvArgumentError(f"env.kwargs.domain/task: unknown DMC task '{domain}-{task}'; "
                               f"known: {known}")
    return suite.load(domain, task, task_kwargs={"random": seed})


class DMCPixels(gym.Env):
    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, domain: str = "cheetah", task: str = "run", action_repeat: int = 2,
                 camera_id: int = 0):
        check("action_repeat", action_repeat, is_int(action_repeat) and action_repeat >= 1,
              "an int >= 1")
        self.domain, self.task, self.repeat = domain, task, action_repeat
        self._env = load_task(domain, task, None)
        cameras = self._env.physics.model.ncam
        check("camera_id", camera_id, is_int(camera_id) and 0 <= camera_id < cameras,
              f"0..{cameras - 1} ({domain} has {cameras} cameras)")
        self.camera_id = camera_id
        spec = self._env.action_spec()
        self.action_space = spaces.Box(spec.minimum.astype(np.float32),
                                       spec.maximum.astype(np.float32), dtype=np.float32)
        self.observation_space = spaces.Box(0, 255, (SIZE, SIZE, 3), np.uint8)
        self.render_mode = "rgb_array"
        try:
            self._frame()
        except Exception as e:  # mujoco raises plain errors when no GL context can be made
            raise RuntimeError(
                f"DMC pixels: MuJoCo could not render offscreen with MUJOCO_GL="
                f"{os.environ.get('MUJOCO_GL')} ({type(e).__name__}: {e}); install Mesa's EGL "
                "(Debian: libegl-mesa0 libgl1-mesa-dri) or use a GPU node") from None

    def _frame(self) -> np.ndarray:
        img = self._env.physics.render(SIZE, SIZE, camera_id=self.camera_id)
        return np.ascontiguousarray(img, dtype=np.uint8)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:  # the task draws its initial state from its own RandomState
            self._env.task.random.seed(seed)
        self._env.reset()
        return self._frame(), {}

    def step(self, action):
        action = np.clip(np.asarray(action, np.float32), self.action_space.low,
                         self.action_space.high)
        reward, terminated, truncated = 0.0, False, False
        for _ in range(self.repeat):
            ts = self._env.step(action)
            reward += ts.reward or 0.0
            if ts.last():
                # discount 0 marks a true terminal in dm_env; DMC suite tasks only time out
                terminated = ts.discount == 0
                truncated = not terminated
                break
        return self._frame(), float(reward), terminated, truncated, {}

    def render(self):
        return self._frame()

    def close(self):
        self._env.close()
