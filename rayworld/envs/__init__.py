"""rayworld's environments, registered with gymnasium under the `rayworld/` namespace."""

from rayworld.envs.registry import MissingExtraError, UnknownEnvError, known_env_ids, make_env, register_all
from rayworld.envs.simple_driving import SimpleDrivingEnv

register_all()

__all__ = ["MissingExtraError", "SimpleDrivingEnv", "UnknownEnvError", "known_env_ids",
           "make_env"]
