"""One registry: env id in a config -> factory, and the pip extra the env needs."""

from __future__ import annotations

import importlib
import math
import numbers
from dataclasses import dataclass, field

import gymnasium as gym


class UnknownEnvError(ValueError):
    pass


class MissingExtraError(ImportError):
    pass


class EnvArgumentError(ValueError):
    """A bad env kwarg, found where the env runs: one line naming env.kwargs.<key>."""


class SimulatorError(RuntimeError):
    """The env's simulator server is unreachable or failed mid-episode.

    Rebuilding the env (a new connection) and redoing the episode may succeed; a collector does
    that up to `collect.env_retries` times.
    """


def check(key: str, value, ok: bool, expected: str):
    """One line naming the env.kwargs key, the value and what was expected."""
    if not ok:
        raise EnvArgumentError(f"env.kwargs.{key}: got {value!r}, expected {expected}")


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # True is an int


def is_number(value) -> bool:
    """A finite real number; not a bool, which Python counts as an int."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Spec:
    factory: str  # "module:function"
    extra: str | None = None  # pip extra that provides `needs`
    needs: tuple = ()  # modules the factory imports
    kwargs: dict = field(default_factory=dict)
    # The factory takes `worker_index`: actor i of a pool talks to server i (CARLA).
    takes_worker_index: bool = False


ENVS = {
    "rayworld/SimpleDriving-v0": Spec("rayworld.envs.simple_driving:SimpleDrivingEnv"),
    "rayworld/CarRacing-v0": Spec("rayworld.envs.carracing:make_carracing", needs=("Box2D", "pygame")),
    "rayworld/Breakout-v0": Spec("rayworld.envs.atari:make_atari", "atari", ("ale_py",),
                                 {"game": "Breakout"}),
    "rayworld/Pong-v0": Spec("rayworld.envs.atari:make_atari", "atari", ("ale_py",), {"game": "Pong"}),
    "rayworld/DMC-v0": Spec("rayworld.envs.dmc:DMCPixels", "dmc", ("dm_control",)),
    "rayworld/DMC-cheetah-run-v0": Spec("rayworld.envs.dmc:DMCPixels", "dmc", ("dm_control",),
                                        {"domain": "cheetah", "task": "run"}),
    "rayworld/DMC-walker-walk-v0": Spec("rayworld.envs.dmc:DMCPixels", "dmc", ("dm_control",),
                                        {"domain": "walker", "task": "walk"}),
    "rayworld/DMC-cartpole-swingup-v0": Spec("rayworld.envs.dmc:DMCPixels", "dmc", ("dm_control",),
                                             {"domain": "cartpole", "task": "swingup"}),
    # Needs a CARLA server per env (docs/carla.md); only the client is a pip package.
    "rayworld/CARLA-v0": Spec("rayworld.envs.carla:CarlaEnv", "carla", ("carla",), takes_worker_index=True),
    # The world model's dream of a trained run: make_env("rayworld/Dream-v0", run_dir=...)
    "rayworld/Dream-v0": Spec("rayworld.dream:DreamEnv", needs=("torch",)),
}


def known_env_ids() -> list[str]:
    return sorted(ENVS)


def _check_needs(env_id: str, spec: Spec):
    for module in spec.needs:
        try:
            importlib.import_module(module)
        except ImportError:
            how = (f"the '{spec.extra}' extra: pip install 'rayworld[{spec.extra}]'"
                   if spec.extra else f"the '{module}' module: pip install -e . reinstalls it")
            raise MissingExtraError(f"env '{env_id}' needs {how} (missing module: {module})") \
                from None


def spec(env_id: str) -> Spec:
    if env_id not in ENVS:
        raise UnknownEnvError(f"unknown env id '{env_id}'; known ids: "
                              f"{', '.join(known_env_ids())}")
    return ENVS[env_id]


def factory(env_id: str):
    s = spec(env_id)
    _check_needs(env_id, s)
    module, name = s.factory.split(":")
    fn = getattr(importlib.import_module(module), name)
    return lambda **kwargs: fn(**{**s.kwargs, **kwargs})


def make_env(env_id: str, worker_index: int | None = None, **kwargs) -> gym.Env:
    """Build a headless env that gives 64x64x3 uint8 frames.

    `worker_index` (the actor's place in its pool) reaches only envs whose Spec takes it.
    """
    if worker_index is not None and spec(env_id).takes_worker_index:
        kwargs["worker_index"] = worker_index
    return factory(env_id)(**kwargs)


def register_all():
    """Make every id available to gymnasium.make (idempotent)."""
    for env_id in ENVS:
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=lambda env_id=env_id, **kw:
                         make_env(env_id, **kw), disable_env_checker=True)
