"""One registry: env id in a config -> factory, and the pip extra the env needs."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import gymnasium as gym


class UnknownEnvError(ValueError):
    pass


class MissingExtraError(ImportError):
    pass


@dataclass(frozen=True)
class Spec:
    factory: str  # "module:function"
    extra: str | None = None  # pip extra that provides `needs`
    needs: tuple = ()  # modules the factory imports
    kwargs: dict = field(default_factory=dict)


ENVS = {
    "rayworld/SimpleDriving-v0": Spec("envs.simple_driving:SimpleDrivingEnv"),
    "rayworld/CarRacing-v0": Spec("envs.carracing:make_carracing", needs=("Box2D", "pygame")),
    "rayworld/Breakout-v0": Spec("envs.atari:make_atari", "atari", ("ale_py",),
                                 {"game": "Breakout"}),
    "rayworld/Pong-v0": Spec("envs.atari:make_atari", "atari", ("ale_py",), {"game": "Pong"}),
    "rayworld/DMC-v0": Spec("envs.dmc:DMCPixels", "dmc", ("dm_control",)),
    "rayworld/DMC-cheetah-run-v0": Spec("envs.dmc:DMCPixels", "dmc", ("dm_control",),
                                        {"domain": "cheetah", "task": "run"}),
    "rayworld/DMC-walker-walk-v0": Spec("envs.dmc:DMCPixels", "dmc", ("dm_control",),
                                        {"domain": "walker", "task": "walk"}),
    "rayworld/DMC-cartpole-swingup-v0": Spec("envs.dmc:DMCPixels", "dmc", ("dm_control",),
                                             {"domain": "cartpole", "task": "swingup"}),
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


def factory(env_id: str):
    if env_id not in ENVS:
        raise UnknownEnvError(f"unknown env id '{env_id}'; known ids: "
                              f"{', '.join(known_env_ids())}")
    spec = ENVS[env_id]
    _check_needs(env_id, spec)
    module, name = spec.factory.split(":")
    fn = getattr(importlib.import_module(module), name)
    return lambda **kwargs: fn(**{**spec.kwargs, **kwargs})


def make_env(env_id: str, **kwargs) -> gym.Env:
    """Build a headless env that gives 64x64x3 uint8 frames."""
    return factory(env_id)(**kwargs)


def register_all():
    """Make every id available to gymnasium.make (idempotent)."""
    for env_id in ENVS:
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=lambda env_id=env_id, **kw:
                         make_env(env_id, **kw), disable_env_checker=True)
