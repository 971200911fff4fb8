"""RLlib in the dream: PPO (RLlib's new API stack) trained on `rayworld/Dream-v0`, scored for real.

The gradient-based alternative to evolving the controller with CMA-ES. PPO samples from the
batched dream (DreamVectorEnv: many dream rollouts per MDN-RNN forward pass) and learns a
Gaussian policy on [z, h]. The trained policy then plays the real env the way `rayworld
evaluate` plays the evolved controller (VAE -> z, MDN-RNN -> h, the same seeds and episodes),
acting with the mean of its action distribution.

The algorithm and its hyperparameters come from a YAML file (tune_configs/rllib_ppo.yaml) plus
`--set key=value`; the run's own config.yaml gives the world model, the dream and the
evaluation seeds. Outputs in the run directory: checkpoints/rllib/ (Algorithm.save_to_path;
re-running resumes from it), rllib.yaml (the resolved algorithm config), tensorboard/rllib,
images/rllib_curves.png and the rllib_* figures in report.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml

from rayworld import storage
from rayworld.config import ConfigError, layered, load_config, merge
from rayworld.io import atomic_path, atomic_write_text, update_report

DREAM_ENV = "rayworld/Dream-v0"
CHECKPOINT = "rllib"  # under <run>/checkpoints
ALGO_FILE = "rllib.yaml"  # the resolved algorithm config, in the run directory
HISTORY = "history.json"  # per-iteration figures, saved inside each checkpoint
MODULE_PATH = ("learner_group", "learner", "rl_module", "default_policy")


@dataclass
class RLlibConfig:
    """The algorithm YAML. Keys mirror PPOConfig's; `lambda` is spelled as in RLlib's docs."""

    algorithm: Literal["PPO"] = "PPO"
    iterations: int = 200  # total training iterations of this run (a re-run goes on to it)
    time_budget_s: float = 0.0  # training wall time per invocation; 0: no limit
    lr: float = 3e-4
    gamma: float = 0.99
    lambda_: float = 0.95  # GAE
    train_batch_size: int = 4000  # env steps per iteration
    minibatch_size: int = 256
    num_epochs: int = 5
    clip_param: float = 0.2
    vf_clip_param: float = 10.0
    vf_loss_coeff: float = 1.0
    entropy_coeff: float = 0.0
    grad_clip: float = 0.5  # global norm; 0: off
    hidden: list = field(default_factory=lambda: [64, 64])  # policy and value MLPs
    activation: Literal["tanh", "relu"] = "tanh"
    num_env_runners: int = 0  # 0: sample in this process (no actor start-up; best on 2 cores)
    num_envs_per_env_runner: int = 32  # dream rollouts stepped in one batch
    num_learners: int = 0  # 0: learn in this process
    num_gpus_per_learner: float = 0.0
    tau: float | None = None  # dream temperature; null: the run's evolve.tau
    max_steps: int | None = None  # per dream rollout; null: the run's evolve.max_steps
    seed: int | None = None  # null: the run's seed
    checkpoint_every: int = 10  # iterations between checkpoints (one is always saved at the end)
    dream_eval_rollouts: int = 64  # deterministic-policy dream rollouts for rllib_dream_return
    eval_episodes: int | None = None  # real episodes; null: the run's evaluate.episodes

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lambda"] = d.pop("lambda_")
        return d


_POSITIVE = ("iterations", "lr", "train_batch_size", "minibatch_size", "num_epochs",
             "clip_param", "vf_clip_param", "num_envs_per_env_runner", "dream_eval_rollouts")
_NON_NEGATIVE = ("time_budget_s", "vf_loss_coeff", "entropy_coeff", "grad_clip",
                 "num_env_runners", "num_learners", "num_gpus_per_learner", "checkpoint_every")


def _check_ranges(rc: RLlibConfig):
    """The ranges the annotations cannot say; the key named is the first one out of range."""
    for f in dataclasses.fields(rc):
        name, value = f.name, getattr(rc, f.name)
        key = "lambda" if name == "lambda_" else name
        if name == "hidden" and not (value and all(isinstance(x, int) and not isinstance(x, bool)
                                                   and x > 0 for x in value)):
            raise ConfigError(f"rllib key '{key}': got {value!r}, expected a non-empty list of "
                              f"positive ints")
        if name in _POSITIVE and value <= 0:
            raise ConfigError(f"rllib key '{key}': got {value!r}, expected a value > 0")
        if name in _NON_NEGATIVE and value < 0:
            raise ConfigError(f"rllib key '{key}': got {value!r}, expected a value >= 0")
        if name in ("gamma", "lambda_") and not 0 <= value <= 1:
            raise ConfigError(f"rllib key '{key}': got {value!r}, expected a value in [0, 1]")
        if name in ("tau", "max_steps", "eval_episodes") and value is not None and value <= 0:
            raise ConfigError(f"rllib key '{key}': got {value!r}, expected null or a value > 0")


def _apply(rc: RLlibConfig, data: dict, where: str):
    try:
        merge(rc, data, label="rllib key", aliases={"lambda": "lambda_"})
        _check_ranges(rc)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_rllib_config(path: str | Path | None = None, overrides: list[str] = (),
                      base: dict | None = None) -> RLlibConfig:
    """Defaults, then `base` (a saved rllib.yaml), then the YAML at `path`, then overrides:
    the same layers and checks as the pipeline's config (rayworld.config.layered)."""
    rc = layered(RLlibConfig(), _apply, base, path, overrides, "rllib config")
    if rc.minibatch_size > rc.train_batch_size:
        raise ConfigError(f"rllib key 'minibatch_size': {rc.minibatch_size} is larger than "
                          f"train_batch_size {rc.train_batch_size}")
    return rc


def make_dream_env(env_config: dict):
    """RLlib's env creator: the batched DreamVectorEnv when RLlib asks for `num_envs`."""
    from rayworld.dream import DreamVectorEnv

    kwargs = dict(env_config)
    if "num_envs" in kwargs:
        return DreamVectorEnv(**kwargs)
    from rayworld.envs import make_env

    return make_env(DREAM_ENV, **kwargs)


def register_dream_env():
    from ray.tune.registry import register_env

    register_env(DREAM_ENV, make_dream_env)


def dream_settings(rc: RLlibConfig, cfg) -> tuple[float, int, int]:
    """(tau, max_steps, seed): the algorithm YAML's, else those CMA-ES used on this run."""
    tau = rc.tau if rc.tau is not None else cfg.evolve.tau
    max_steps = rc.max_steps if rc.max_steps is not None else cfg.evolve.max_steps
    return tau, max_steps, rc.seed if rc.seed is not None else cfg.seed


def build_config(rc: RLlibConfig, cfg, run_dir: Path):
    """The PPOConfig for this run's dream."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    tau, max_steps, seed = dream_settings(rc, cfg)
    return (
        PPOConfig()
        .environment(DREAM_ENV, env_config={"run_dir": str(run_dir), "tau": tau,
                                            "max_steps": max_steps})
        # vector_entry_point: RLlib asks our creator for one batched env of num_envs dreams
        .env_runners(num_env_runners=rc.num_env_runners,
                     num_envs_per_env_runner=rc.num_envs_per_env_runner,
                     gym_env_vectorize_mode="vector_entry_point")
        .learners(num_learners=rc.num_learners, num_gpus_per_learner=rc.num_gpus_per_learner)
        .training(lr=rc.lr, gamma=rc.gamma, lambda_=rc.lambda_,
                  train_batch_size_per_learner=rc.train_batch_size,
                  minibatch_size=rc.minibatch_size, num_epochs=rc.num_epochs,
                  clip_param=rc.clip_param, vf_clip_param=rc.vf_clip_param,
                  vf_loss_coeff=rc.vf_loss_coeff, entropy_coeff=rc.entropy_coeff,
                  grad_clip=rc.grad_clip or None)
        .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=list(rc.hidden),
                                                   fcnet_activation=rc.activation))
        .debugging(seed=seed)
    )


class MeanActionPolicy:
    """An RLModule as a policy on (z, h): the mean (Categorical: the mode) of its action
    distribution, mapped to the env's bounds as RLlib's module-to-env connector does."""

    def __init__(self, module, action_space, normalize_actions: bool = True,
                 clip_actions: bool = False):
        self.module, self.action_space = module.eval(), action_space
        self.normalize_actions, self.clip_actions = normalize_actions, clip_actions

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        from ray.rllib.utils.spaces.space_utils import clip_action, unsquash_action

        obs = torch.cat([z, h], dim=-1).float().cpu()
        inputs = self.module.forward_inference({"obs": obs})["action_dist_inputs"]
        dist = self.module.get_inference_action_dist_cls().from_logits(inputs)
        action = dist.to_deterministic().sample().numpy()
        if self.normalize_actions:
            action = unsquash_action(action, self.action_space)
        elif self.clip_actions:
            action = clip_action(action, self.action_space)
        return torch.as_tensor(action, device=z.device)


def load_policy(checkpoint_dir: Path, action_space, normalize_actions: bool = True,
                clip_actions: bool = False) -> MeanActionPolicy:
    """The trained policy straight from an Algorithm checkpoint (no env runners, no learner)."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    module = RLModule.from_checkpoint(str(Path(checkpoint_dir).joinpath(*MODULE_PATH)))
    return MeanActionPolicy(module, action_space, normalize_actions, clip_actions)


def _save_checkpoint(algo, ckpt: Path, history: dict):
    """Save to a fresh folder, then swap it in: a crash never leaves half a checkpoint."""
    tmp, old = ckpt.with_name(ckpt.name + ".tmp"), ckpt.with_name(ckpt.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    algo.save_to_path(str(tmp))
    (tmp / HISTORY).write_text(json.dumps(history))
    if ckpt.exists():
        ckpt.rename(old)
    tmp.rename(ckpt)
    shutil.rmtree(old, ignore_errors=True)
    storage.publish_folder(ckpt, HISTORY)  # a run in object storage: the bucket holds it now
    storage.publish(ckpt.parents[1], "tensorboard/rllib")


def _find_checkpoint(ckpt: Path) -> Path | None:
    old = ckpt.with_name(ckpt.name + ".old")
    if not ckpt.exists() and (old / HISTORY).exists():  # crashed between the two renames
        old.rename(ckpt)
    return ckpt if (ckpt / HISTORY).exists() else None


def _saved_iteration(ckpt: Path) -> int | None:
    if not (ckpt / HISTORY).exists():
        return None
    its = json.loads((ckpt / HISTORY).read_text())["iteration"]
    return its[-1] if its else 0


def _run_config(run_dir: Path):
    path = run_dir / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train-rllib needs a run with a trained "
                                "world model (rayworld pipeline --out ...)")
    return load_config(base=yaml.safe_load(path.read_text()))


def _save_plot(history: dict, dream_return: float | None, path: Path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    # iterations in which no dream ended have no return (nan): plot the others only
    points = [(i, r) for i, r in zip(history["iteration"], history["dream_return"])
              if math.isfinite(r)]
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None,
                label="training dreams (sampled actions)")
    if dream_return is not None:
        ax.axhline(dream_return, color="tab:green", ls="--",
                   label=f"trained policy, mean action: {dream_return:.2f}")
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("dream return")
    ax.set_title("RLlib PPO in the dream")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _train(algo, rc: RLlibConfig, history: dict, ckpt: Path, writer, log) -> float:
    """PPO iterations until `iterations` or the time budget, whichever comes first.

    Returns the training wall time. An iteration is not started when the last one's duration
    says it would end past the budget, so the budget is not overrun.
    """
    t0 = time.perf_counter()
    last = 0.0
    while algo.training_iteration < rc.iterations:
        elapsed = time.perf_counter() - t0
        if rc.time_budget_s and last and elapsed + last > rc.time_budget_s:
            log(f"rllib: time budget {rc.time_budget_s:.0f} s reached after {elapsed:.1f} s")
            break
        t = time.perf_counter()
        result = algo.train()
        last = time.perf_counter() - t
        it = algo.training_iteration
        runners = result.get("env_runners", {})
        ret = float(runners.get("episode_return_mean", math.nan))  # nan: no episode ended
        steps = int(result.get("num_env_steps_sampled_lifetime", 0))
        learner = result.get("learners", {}).get("default_policy", {})
        history["iteration"].append(it)
        history["dream_return"].append(ret)
        history["env_steps"].append(steps)
        history["s_per_iter"].append(last)
        scalars = {"dream_return_mean": ret, "env_steps": steps, "s_per_iter": last,
                   "episode_len_mean": runners.get("episode_len_mean")}
        for k in ("policy_loss", "vf_loss", "entropy", "mean_kl_loss", "vf_explained_var"):
            scalars[k] = learner.get(k)
        for k, v in scalars.items():
            if v is not None and math.isfinite(float(v)):
                writer.add_scalar(f"rllib/{k}", float(v), it)
        writer.flush()
        ended = int(runners.get("num_episodes", 0))
        shown = f"{ret:.2f} over {ended} dreams" if ended else "- (no dream ended)"
        log(f"rllib iter {it}/{rc.iterations}: dream return {shown} | {steps} env steps | "
            f"{last:.2f} s/iter")
        if rc.checkpoint_every and it % rc.checkpoint_every == 0:
            _save_checkpoint(algo, ckpt, history)
    return time.perf_counter() - t0


def _dream_return(policy, run_dir: Path, tau: float, max_steps: int, rollouts: int,
                  seed: int) -> float:
    """Mean dream return of the deterministic policy over `rollouts` batched dreams."""
    from rayworld.dream import BatchedDream, WorldModel

    dream = BatchedDream(WorldModel.load(run_dir), tau, max_steps)
    return float(dream.rollout(policy, rollouts, seed).mean())


def score_real(policy, cfg, run_dir: Path, episodes: int, desc: str = "rllib evaluate"):
    """Real-env returns of `policy` on `rayworld evaluate`'s seeds, in parallel Ray actors."""
    import ray

    from rayworld.evaluate import play_real

    # one copy of the policy in the object store, not one per episode
    return play_real(run_dir, cfg, {desc: ray.put(policy)}, episodes,
                     name="rllib-real-evaluator")[desc]


def train_rllib(run_dir: str | Path, algo_config: str | Path | None, overrides: list[str],
                log=print) -> dict:
    """Train PPO in the run's dream, checkpoint it, score it in the real env; returns figures.

    Ray must already be initialised (the CLI does it). Without `algo_config`, a re-run reuses
    the run's saved rllib.yaml.
    """
    import ray

    from rayworld.dream import WorldModel, dream_spaces
    from rayworld.evaluate import return_stats
    from rayworld.train.common import tb_writer

    start = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    cfg = _run_config(run_dir)
    saved = run_dir / ALGO_FILE
    base = yaml.safe_load(saved.read_text()) if algo_config is None and saved.exists() else None
    rc = load_rllib_config(algo_config, overrides, base=base)
    if not ray.is_initialized():
        raise RuntimeError("train-rllib: Ray is not initialised; call ray.init() first")
    # also fails early, with the stage to run, when the run has no world model yet
    _, action_space = dream_spaces(WorldModel.load(run_dir))
    tau, max_steps, seed = dream_settings(rc, cfg)
    ckpt = run_dir / "checkpoints" / CHECKPOINT
    found = _find_checkpoint(ckpt)
    history = {"iteration": [], "dream_return": [], "env_steps": [], "s_per_iter": [],
               "hidden": list(rc.hidden), "activation": rc.activation}
    if found:
        history = json.loads((found / HISTORY).read_text())
        if (history["hidden"], history["activation"]) != (list(rc.hidden), rc.activation):
            raise ValueError(f"{found} holds a policy with hidden {history['hidden']} "
                             f"({history['activation']}), the config asks for {list(rc.hidden)} "
                             f"({rc.activation}); use another run directory or remove {found}")
    atomic_write_text(saved, yaml.safe_dump(rc.to_dict(), sort_keys=False))

    register_dream_env()
    algo_cfg = build_config(rc, cfg, run_dir)
    # The sampler and learner run in this process: with more torch threads than cores the
    # small per-step tensor ops thrash (measured 10x slower on 2 cores); restored below.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    writer = tb_writer(run_dir, "rllib")
    try:
        t = time.perf_counter()
        algo = algo_cfg.build_algo()
        build_s = time.perf_counter() - t
        log(f"rllib: PPO built in {build_s:.1f} s "
            f"({rc.num_env_runners} env runners x {rc.num_envs_per_env_runner} dreams, "
            f"tau {tau}, max_steps {max_steps})")
        try:
            if found:
                # build_algo + restore rather than Algorithm.from_checkpoint: the env config
                # stays this run's (a copied run directory must dream its own world model)
                algo.restore_from_path(str(found))
                log(f"rllib: resuming after iteration {algo.training_iteration} from {found}")
            train_s = _train(algo, rc, history, ckpt, writer, log)
            iterations = algo.training_iteration
            if _saved_iteration(ckpt) != iterations:
                _save_checkpoint(algo, ckpt, history)
            normalize, clip = algo_cfg.normalize_actions, algo_cfg.clip_actions
        finally:
            algo.stop()  # frees its CPUs for the real-env actors below

        policy = load_policy(ckpt, action_space, normalize, clip)
        dream_ret = _dream_return(policy, run_dir, tau, max_steps, rc.dream_eval_rollouts, seed)
        episodes = rc.eval_episodes or cfg.evaluate.episodes
        returns = score_real(policy, cfg, run_dir, episodes)
        writer.add_scalar("rllib/real_return_mean", float(returns.mean()), iterations)
        writer.add_scalar("rllib/dream_return_mean_action", dream_ret, iterations)
    finally:
        writer.close()
        torch.set_num_threads(threads)

    finite = [r for r in history["dream_return"] if math.isfinite(r)]
    figures = {
        **return_stats(returns, "rllib_real_return"),
        "rllib_dream_return": dream_ret,
        "rllib_dream_episode_return": finite[-1] if finite else None,
        "rllib_iterations": iterations,
        "rllib_env_steps": history["env_steps"][-1] if history["env_steps"] else 0,
        "rllib_train_s": train_s,  # training iterations only: the time budget's clock
        "rllib_build_s": build_s,
        "rllib_episodes": episodes,
    }
    _save_plot(history, dream_ret, run_dir / "images" / "rllib_curves.png")
    figures["wall_s"] = time.perf_counter() - start
    update_report(run_dir, **{k: v for k, v in figures.items() if k != "wall_s" and v is not None},
                  wall_s={"train-rllib": round(figures["wall_s"], 2)})
    log(f"rllib: real return {figures['rllib_real_return_mean']:.2f} +/- "
        f"{figures['rllib_real_return_std']:.2f} (se {figures['rllib_real_return_se']:.2f}) over "
        f"{episodes} episodes | dream return (mean action) {dream_ret:.2f} | {iterations} "
        f"iterations, {figures['rllib_env_steps']} env steps, {train_s:.1f} s training")
    return figures

