"""Typed configuration: dataclass defaults, a YAML preset on top, then `--set key=value`.

Every key is checked: an unknown key or a value of the wrong type fails at once with one
line that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config key or value that is not allowed."""


@dataclass
class EnvConfig:
    # "" for data with no env to play in (nuScenes logs): the pipeline stops after train-mdn
    id: str = "rayworld/SimpleDriving-v0"
    kwargs: dict = field(default_factory=dict)  # passed to the env's constructor


@dataclass
class SourceConfig:
    """Where the collect stage gets episodes: an env, or a dataset converted to our shards."""

    kind: Literal["env", "nuscenes", "offline"] = "env"
    path: str = ""  # nuscenes: the dataroot; offline: an HDF5/NPZ file or a directory of them
    version: str = "v1.0-mini"  # nuscenes: the table version under the dataroot
    camera: str = "CAM_FRONT"  # nuscenes: the camera channel that becomes obs
    keyframes_only: bool = False  # nuscenes: 2 Hz keyframes instead of every ~12 Hz frame
    keys: dict = field(default_factory=dict)  # offline: our name -> the file's, {obs: pixels}


@dataclass
class CollectConfig:
    episodes: int = 64
    max_steps: int = 300  # per episode; the env may end it earlier
    # rayworld.policies: random, brownian, drive (gas-biased, for cars), track (a scripted road
    # follower), gait (sine waves per joint, for DMC bodies), paddle (Breakout: the paddle goes
    # where the ball will land), random_controller (the paper's: small random weights on
    # [z, h]), controller (the evolved one plus `noise`)
    policy: Literal["random", "brownian", "drive", "track", "gait", "paddle",
                    "random_controller", "controller"] = "brownian"
    brownian_sigma: float = 0.5  # std of the action's random walk per sqrt(second)
    gas: float = 0.7  # drive, track: the gas level the walk reverts to
    noise: float = 0.1  # controller: exploration noise std (discrete: random-action probability)
    # shares of the episodes that use another model-free policy, e.g. {drive: 0.25}: expert
    # data alone never shows what an action does away from the expert's states
    mix: dict = field(default_factory=dict)
    # track: lapses per step, where the driver stops steering; straight_lapses: the share of
    # them that hold the wheel straight for 30 to 150 steps, so the data shows where driving
    # straight on leaves a bend (the others hold a random wheel for 10 to 60 steps)
    lapses: float = 0.002
    straight_lapses: float = 0.0
    num_actors: int = 0  # 0: one per CPU that Ray sees
    seed: int = 0  # episode i uses env seed `seed + i`
    # An env whose simulator server fails (CARLA) is rebuilt and the episode redone this often
    env_retries: int = 2
    # Extra Ray resources per collector, e.g. {carla: 1}: one collector per CARLA server's node
    actor_resources: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    val_every: int = 10  # every val_every-th episode is held out for validation
    shuffle_buffer: int = 4096  # frames held in the streaming shuffle buffer per worker
    compression: Literal["zstd", "snappy", "none"] = "zstd"


@dataclass
class VAEConfig:
    latent: int = 32
    beta: float = 1.0
    kl_tolerance: float = 0.5  # free bits: KL below kl_tolerance * latent is not penalised
    # extra weight on pixels that differ from the batch's median frame (moving objects: a
    # Breakout ball and paddle); 0: the paper's plain L2
    foreground_weight: float = 0.0
    kl_warmup_steps: int = 0
    lr: float = 1e-3
    encoder_lr: float = 0.0  # 0: lr
    decoder_lr: float = 0.0  # 0: lr
    batch_size: int = 64  # per worker and micro-batch
    epochs: int = 10
    grad_clip: float = 0.0  # max global grad norm; 0: off
    grad_accum: int = 1  # micro-batches per optimiser step
    amp: Literal["off", "bf16", "fp16"] = "off"  # autocast; fp16 adds a GradScaler
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0  # linear lr warmup, in optimiser steps
    min_lr: float = 0.0  # where the cosine schedule ends


@dataclass
class MDNConfig:
    hidden: int = 256
    mixtures: int = 5
    seq_len: int = 32  # steps per backprop window
    # true: truncated backprop through whole episodes (the LSTM state carries over from one
    # window to the next, so late-episode h is in distribution); false: random windows from 0
    tbptt: bool = True
    batch_size: int = 32  # per worker and micro-batch
    epochs: int = 20
    lr: float = 1e-3
    dynamics_lr: float = 0.0  # the LSTM; 0: lr
    head_lr: float = 0.0  # the mixture, reward and done heads; 0: lr
    dropout: float = 0.0  # on h before the heads; the dream can keep it on (evolve.dropout)
    # E > 1: E sets of heads (next z, reward, done) on one shared LSTM, each trained on its own
    # bootstrap of the batches; the dream uses them as evolve.ensemble says
    ensemble: int = 1
    # h: the reward head reads the LSTM state; latents: a small MLP reads (z_t, z_{t+1}), so
    # the dream pays only for what its frames show
    reward_from: Literal["h", "latents"] = "h"
    reward_weight: float = 1.0
    done_weight: float = 1.0
    done_pos_weight: float = 10.0  # episode ends are rare: weigh them up
    grad_clip: float = 1.0
    grad_accum: int = 1
    amp: Literal["off", "bf16", "fp16"] = "off"
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0


@dataclass
class ControllerConfig:
    # linear, mlp: a small policy evolved in the dream; mpc: no policy, the agent plans in the
    # dream from every real frame (the plan.* keys)
    kind: Literal["linear", "mlp", "mpc"] = "linear"
    # what it reads: [z, h], the paper's, or the frame's z alone (a reactive policy: the dream's
    # h late in a rollout need not look like the real env's)
    inputs: Literal["zh", "z"] = "zh"
    # the real agent's z: the VAE's mean, or a sample of its posterior, like the latents the
    # MDN-RNN trained on and the dream feeds the controller
    z: Literal["mean", "sample"] = "mean"
    mlp_hidden: list = field(default_factory=lambda: [64])


@dataclass
class EvolveConfig:
    population: int = 16  # CMA-ES candidates per generation (the paper: 64)
    rollouts: int = 4  # dream rollouts per candidate (the paper: 16)
    sigma0: float = 0.1
    generations: int = 20
    tau: float = 1.0  # dream temperature
    max_steps: int = 300  # per dream rollout
    num_actors: int = 0  # dream evaluators; 0: one per CPU
    # score the CMA-ES mean every K generations, in the dream and the real env at the real
    # horizon (evaluate.max_steps), on real_episodes episodes; 0 episodes turns it off
    real_every: int = 5
    real_episodes: int = 4
    where: Literal["dream", "real"] = "dream"  # real: candidates play the real env (the paper's 906)
    common_noise: bool = True  # every candidate of a generation meets the same dreams / seeds
    diagonal: bool = False  # sep-CMA-ES: a diagonal covariance, faster for big controllers
    # keep the MDN-RNN's dropout (mdn.dropout) on in the dream: one mask per rollout, or a new
    # one every step; off: the plain mean model
    dropout: Literal["off", "rollout", "step"] = "rollout"
    # threshold: a dream ends where the done head's P(end) > 0.5; survival: each reward is
    # weighted by P(still running), so a controller gains nothing where the model is unsure
    done: Literal["threshold", "survival"] = "survival"
    # with mdn.ensemble > 1. member: each rollout follows one member (next z, reward, done);
    # pessimistic: the same, but each step's reward is the lowest the members predict
    ensemble: Literal["member", "pessimistic"] = "member"
    # CMA-ES's starting mean. zero: all weights 0. clone: the controller fitted to the actions
    # of the best clone_top of the collected episodes (by real return), scored in the real
    # env as generation 0 when real checks are on
    init: Literal["zero", "clone"] = "zero"
    clone_top: float = 0.5
    # a dream step costs anchor x the squared gap between the candidate's action and the
    # starting controller's (the clone's) on the same state; 0: the plain dream return
    anchor: float = 0.0
    # where fitness dreams start. first: the episodes' first frames, LSTM state zero. data:
    # start_states states drawn from every step of the collected episodes (the LSTM state
    # teacher-forced up to there); short dreams from them (max_steps ~100) score a controller
    # where the model is right, not in what a long open-loop dream drifts into. The real
    # checks' dream score always starts at the first frames, as the real env does.
    start: Literal["first", "data"] = "first"
    start_states: int = 4096
    gpus_per_actor: float = 0.25  # with ray.use_gpu: dream evaluators share each GPU


@dataclass
class PlanConfig:
    """controller.kind mpc: the cross-entropy method over action sequences in the dream, from
    the agent's own [z, h] at every real step (rayworld.plan)."""

    horizon: int = 12  # plan steps looked ahead; each holds its action action_repeat dream steps
    candidates: int = 64  # action sequences per CEM iteration, all dreamt in one batch
    iterations: int = 3  # CEM refinements per plan
    elites: int = 8  # the best candidates that the next iteration's distribution is fitted to
    action_repeat: int = 2  # real and dream steps per planned action; re-plans this often
    rollouts: int = 1  # dreams per candidate (common random numbers across candidates)
    tau: float = 0.0  # dream temperature; 0: the most likely component's mean, no noise
    std: float = 0.5  # the first sampling std, as a share of each action's range
    min_std: float = 0.05  # the std never shrinks below this share (keeps searching)
    # as in evolve.*: the MDN-RNN's dropout kept on, how a dream's end counts, ensemble use
    dropout: Literal["off", "rollout", "step"] = "off"
    done: Literal["threshold", "survival"] = "survival"
    ensemble: Literal["member", "pessimistic"] = "member"


@dataclass
class EvaluateConfig:
    episodes: int = 32
    max_steps: int = 1000
    seed: int = 100_000  # real-env seeds seed..seed+episodes-1, the same for every policy
    # merged over env.kwargs wherever a controller is scored in the real env (evaluate, evolve's
    # real checks, evolve.where: real): the data may end episodes early, the score must not
    env_kwargs: dict = field(default_factory=dict)


@dataclass
class TrackConfig:
    """The trackers users already use, through Ray's integrations (rayworld.track)."""

    wandb: bool = False  # offline (files under <run>/wandb) unless WANDB_API_KEY is set
    wandb_project: str = "rayworld"
    mlflow: str = ""  # a tracking URI (http://host:5000, file:/path); "" leaves MLflow off
    mlflow_experiment: str = "rayworld"


@dataclass
class RayConfig:
    address: str = ""  # "" starts Ray in-process; "auto" or ray://host:10001 joins a cluster
    num_cpus: int = 0  # in-process Ray only; 0: all cores
    object_store_mb: int = 1024  # in-process Ray only
    # in-process Ray only. Ray Train 2.60 asks the dashboard's State API whether a finished
    # run's controller is gone; without it a helper actor per fit() polls and warns forever.
    dashboard: bool = True
    num_workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # Ray Train restarts from the last checkpoint after a worker dies


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    env: EnvConfig = field(default_factory=EnvConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    mdn: MDNConfig = field(default_factory=MDNConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    evolve: EvolveConfig = field(default_factory=EvolveConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _type_name(tp) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp, value, label: str = "config key"):
    """Check `value` against the annotation `tp`; allow int where float is expected.

    `X | None` accepts None or an X. `label` names the kind of key in errors.
    """
    if get_origin(tp) is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{label} '{key}': got {value!r}, expected {_type_name(tp)}")
        return value
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise ConfigError(f"{label} '{key}': unsupported union type")
        if value is None:
            return None
        tp = args[0]
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        dict: lambda v: isinstance(v, dict),
        list: lambda v: isinstance(v, (list, tuple)),
    }[tp]
    if not ok(value):
        raise ConfigError(f"{label} '{key}': got {value!r}, expected {_type_name(tp)}")
    if tp is float:
        return float(value)
    if tp is list:
        return list(value)
    return value


def merge(obj, data: dict, prefix: str = "", label: str = "config key",
          aliases: dict | None = None):
    """Set the dataclass `obj`'s fields from `data`, checking each value against its annotation.

    Presets, sweep files and the RLlib file all go through here. `aliases` maps a key as users
    spell it to the field's name (RLlib's `lambda` is the field `lambda_`); `label` names the
    kind of key in errors.
    """
    spelled = {name: key for key, name in (aliases or {}).items()}
    fields = {spelled.get(f.name, f.name): f.name for f in dataclasses.fields(obj)}
    if not isinstance(data, dict):
        raise ConfigError(f"{label} '{prefix.rstrip('.') or '<root>'}': expected a mapping, "
                          f"got {data!r}")
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        full = prefix + str(key)
        if key not in fields:
            raise ConfigError(f"unknown {label} '{full}'; allowed here: {', '.join(fields)}")
        name = fields[key]
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            merge(getattr(obj, name), value, full + ".", label, aliases)
        elif tp is dict and isinstance(value, dict):  # --set env.kwargs.host=x keeps the rest
            setattr(obj, name, deep_update(getattr(obj, name), value))
        else:
            setattr(obj, name, _coerce(full, tp, value, label))


def _validate(cfg: Config):
    positive = {
        "collect.episodes": cfg.collect.episodes, "collect.max_steps": cfg.collect.max_steps,
        "vae.latent": cfg.vae.latent, "vae.batch_size": cfg.vae.batch_size,
        "vae.epochs": cfg.vae.epochs, "vae.lr": cfg.vae.lr,
        "mdn.hidden": cfg.mdn.hidden, "mdn.mixtures": cfg.mdn.mixtures,
        "mdn.seq_len": cfg.mdn.seq_len, "mdn.batch_size": cfg.mdn.batch_size,
        "mdn.epochs": cfg.mdn.epochs, "mdn.lr": cfg.mdn.lr, "mdn.ensemble": cfg.mdn.ensemble,
        "vae.grad_accum": cfg.vae.grad_accum, "mdn.grad_accum": cfg.mdn.grad_accum,
        "ray.num_workers": cfg.ray.num_workers, "ray.cpus_per_worker": cfg.ray.cpus_per_worker,
        "data.val_every": cfg.data.val_every, "data.shuffle_buffer": cfg.data.shuffle_buffer,
        "evolve.population": cfg.evolve.population, "evolve.rollouts": cfg.evolve.rollouts,
        "evolve.sigma0": cfg.evolve.sigma0,
        "evolve.tau": cfg.evolve.tau, "evolve.max_steps": cfg.evolve.max_steps,
        "evolve.real_every": cfg.evolve.real_every, "evolve.start_states": cfg.evolve.start_states,
        "evolve.gpus_per_actor": cfg.evolve.gpus_per_actor, "evaluate.episodes": cfg.evaluate.episodes,
        "evaluate.max_steps": cfg.evaluate.max_steps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}': got {value!r}, expected a value > 0")
    for key, value in {"collect.num_actors": cfg.collect.num_actors,
                       "collect.env_retries": cfg.collect.env_retries,
                       "ray.num_cpus": cfg.ray.num_cpus, "ray.max_failures": cfg.ray.max_failures,
                       "vae.beta": cfg.vae.beta,
                       "evolve.num_actors": cfg.evolve.num_actors,
                       "evolve.generations": cfg.evolve.generations,  # 0: keep the start
                       "evolve.real_episodes": cfg.evolve.real_episodes,
                       "evolve.anchor": cfg.evolve.anchor,
                       "vae.kl_warmup_steps": cfg.vae.kl_warmup_steps,
                       **{f"{m}.{k}": getattr(getattr(cfg, m), k) for m, keys in
                          {"vae": ("encoder_lr", "decoder_lr", "grad_clip", "warmup_steps",
                                   "min_lr", "foreground_weight"),
                           "mdn": ("dynamics_lr", "head_lr", "grad_clip", "warmup_steps",
                                   "min_lr")}.items() for k in keys}}.items():
        if value < 0:
            raise ConfigError(f"config key '{key}': got {value!r}, expected a value >= 0")
    if cfg.vae.foreground_weight > 0 and cfg.vae.batch_size < 3:
        raise ConfigError(f"config key 'vae.batch_size': got {cfg.vae.batch_size}, expected 3 "
                          "or more with vae.foreground_weight > 0 (the median frame of a "
                          "smaller batch is the frame itself)")
    if cfg.evolve.anchor > 0 and cfg.evolve.where != "dream":
        raise ConfigError(f"config key 'evolve.anchor': got {cfg.evolve.anchor!r} with "
                          "evolve.where 'real', expected 0 (the anchor is a dream cost)")
    for key in ("lapses", "straight_lapses"):
        if not 0 <= getattr(cfg.collect, key) <= 1:
            raise ConfigError(f"config key 'collect.{key}': got {getattr(cfg.collect, key)!r}, "
                              "expected a share in [0, 1]")
    if not 0 < cfg.evolve.clone_top <= 1:
        raise ConfigError(f"config key 'evolve.clone_top': got {cfg.evolve.clone_top!r}, "
                          "expected a fraction in (0, 1]")
    model_free = ("random", "brownian", "drive", "track", "gait", "paddle")
    for name, share in cfg.collect.mix.items():
        if name not in model_free:
            raise ConfigError(f"config key 'collect.mix.{name}': expected a model-free policy, "
                              f"one of {', '.join(model_free)}")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ConfigError(f"config key 'collect.mix.{name}': got {share!r}, expected a share "
                              "of the episodes in (0, 1]")
    if sum(cfg.collect.mix.values()) > 1:
        raise ConfigError(f"config key 'collect.mix': shares sum to {sum(cfg.collect.mix.values())}"
                          ", expected at most 1")
    for name, amount in cfg.collect.actor_resources.items():
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
            raise ConfigError(f"config key 'collect.actor_resources.{name}': got {amount!r}, "
                              "expected a Ray resource amount > 0")
    if cfg.source.kind != "env" and not cfg.source.path:
        raise ConfigError(f"config key 'source.path': source.kind is {cfg.source.kind!r}, "
                          "expected the dataset's path")
    if cfg.source.kind == "nuscenes" and cfg.env.id:
        raise ConfigError(f"config key 'env.id': got {cfg.env.id!r}, expected '' with source.kind "
                          "'nuscenes' (driving logs have no env to play controllers in)")
    if cfg.source.kind == "env" and not cfg.env.id:
        raise ConfigError("config key 'env.id': empty, expected an env id when source.kind is 'env'")
    if cfg.controller.kind == "mpc" and cfg.collect.policy == "random_controller":
        raise ConfigError("config key 'collect.policy': got 'random_controller' with "
                          "controller.kind 'mpc', expected a policy a planner can drive (a "
                          "random controller needs weights; the planner has none)")
    pc = cfg.plan
    for key in ("horizon", "candidates", "iterations", "elites", "action_repeat", "rollouts",
                "std"):
        if getattr(pc, key) <= 0:
            raise ConfigError(f"config key 'plan.{key}': got {getattr(pc, key)!r}, expected a "
                              "value > 0")
    for key in ("tau", "min_std"):
        if getattr(pc, key) < 0:
            raise ConfigError(f"config key 'plan.{key}': got {getattr(pc, key)!r}, expected a "
                              "value >= 0")
    if pc.elites > pc.candidates:
        raise ConfigError(f"config key 'plan.elites': got {pc.elites}, expected at most "
                          f"plan.candidates ({pc.candidates}): the elites are the best candidates")
    if cfg.data.val_every < 2:
        raise ConfigError("config key 'data.val_every': expected >= 2 (1 would hold out all data)")


# ---------------------------------------------------------------- which keys shape each stage

# config keys (a trailing dot: every key under it) that shape each stage's output; the
# pipeline's provenance compares them (rayworld.pipeline). Collect only adds episodes.
STAGE_KEYS = {"collect": (), "encode": (),
        "train-vae": ("seed", "vae.", "data.val_every"),
        "train-mdn": ("seed", "mdn.", "data.val_every"),
        "evolve": ("seed", "evolve.", "controller.", "env.", "evaluate.env_kwargs"),
        "evaluate": ("evaluate.", "controller.z", "env.", "plan.")}
# counts that grow (a resume, not a change), and keys that only watch or place the work
STAGE_COUNTS = {"train-vae": "vae.epochs", "train-mdn": "mdn.epochs", "evolve": "evolve.generations"}
IGNORED = ("evolve.real_every", "evolve.real_episodes", "evolve.num_actors",
           "evolve.gpus_per_actor")


def flat(cfg) -> dict:
    """section.key -> value; a key that holds a dict (env.kwargs) stays one value."""
    out = {}
    for k, v in cfg.to_dict().items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def stage_keys(stage: str, cfg) -> dict:
    """The config keys that shape `stage`'s output, without its count."""
    keys = flat(cfg)
    skip = (STAGE_COUNTS.get(stage), *IGNORED)
    planner = cfg.controller.kind == "mpc"  # plan.* shapes nothing an evolved controller does
    return {k: v for k, v in sorted(keys.items()) if k not in skip and
            (planner or not k.startswith("plan.")) and
            any(k == p or (p.endswith(".") and k.startswith(p)) for p in STAGE_KEYS[stage])}


def parse_set(item: str) -> tuple[str, object]:
    """`vae.lr=3e-4` -> ('vae.lr', 0.0003); the value is read as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. vae.lr=3e-4")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str):  # YAML reads 3e-4 as a string; numbers must stay numbers
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.strip(), value


def _nest(key: str, value) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def read_yaml(path: Path, what: str = "config file"):
    """A YAML file's contents ({} when empty); a missing file or bad YAML is one line."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path}: not valid YAML ({str(e).splitlines()[0]})") from None


def layered(obj, apply, base: dict | None, path, overrides, what: str):
    """`obj` (the defaults), then `base` (a saved, resolved dict), then the YAML at `path`, then
    `--set` overrides, each through apply(obj, data, where); `where` starts every error."""
    if base:
        apply(obj, base, f"saved {what}")
    if path is not None:
        apply(obj, read_yaml(Path(path), what), str(path))
    for item in overrides:
        key, value = parse_set(item)
        apply(obj, _nest(key, value), f"--set {item}")
    return obj


def _apply(cfg: Config, data: dict, where: str):
    try:
        merge(cfg, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                base: dict | None = None) -> Config:
    """Defaults, then `base` (a resolved dict), then the YAML file at `path`, then overrides."""
    cfg = layered(Config(), _apply, base, path, overrides, "config file")
    _validate(cfg)
    return cfg


def save_config(cfg: Config, path: Path):
    from rayworld.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def with_values(base: dict, values: dict) -> Config:
    """`base` (a resolved config dict) with dotted keys set, e.g. {"vae.lr": 3e-4}; validated."""
    cfg = load_config(base=base)
    for key, value in values.items():
        merge(cfg, _nest(key, value))
    _validate(cfg)
    return cfg


def deep_update(base: dict, extra: dict) -> dict:
    """A copy of `base` with the nested mapping `extra` merged in."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out
