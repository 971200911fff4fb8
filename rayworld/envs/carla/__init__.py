"""CARLA (https://carla.org) as a rayworld env: `rayworld/CARLA-v0`, one server per env.

Needs the `carla` client (pip install 'rayworld[carla]') and a running CARLA server; see
docs/carla.md for servers beside the Ray workers.
"""

from rayworld.envs.carla.env import CarlaEnv
from rayworld.envs.carla.server import CarlaServerError

__all__ = ["CarlaEnv", "CarlaServerError"]
