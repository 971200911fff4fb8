"""`rayworld tune`: Ray Tune sweeps defined in YAML.

A sweep file is a preset (`base:` plus config keys, like any preset) with a `sweep:` block:
the stage to tune, the metric, the search space, the scheduler and the trial resources.

- stage vae / mdn: each trial is a small driver that runs the real Ray Train job (TorchTrainer,
  `ray.num_workers` DDP workers) on the shared data; Train's per-epoch reports reach Tune
  through TuneReportCallback, so ASHA can stop weak trials early. Checkpoints are Ray Train's
  own, in the trial's directory; an interrupted sweep resumes with Tuner.restore.
- stage controller: each trial is one CMA-ES run in the dream that reports every generation and
  checkpoints its CMA-ES state. PopulationBasedTraining copies a strong run's state into a weak
  one and perturbs its hyperparameters (dream temperature, sigma, population, rollouts). The
  best trial's controller is then scored in the real env.

The shared data come from `--data RUN` or, without it, from the prerequisite stages run in the
sweep's own directory. Outputs: `tune/` (Tune's experiment), `best/` (config and checkpoint of
the best trial) and `sweep_report.json`.
"""

from __future__ import annotations

import math
import pickle
import shutil
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import yaml

from rayworld import storage
from rayworld.config import (
    ConfigError,
    _nest,
    deep_update,
    load_config,
    merge,
    parse_set,
    read_yaml,
    save_config,
    with_values,
)
from rayworld.io import atomic_path, atomic_write_json, atomic_write_text
from rayworld.telemetry import record
from rayworld.track import tune_callbacks

NEEDS = {"vae": ("collect",), "mdn": ("collect", "train-vae", "encode"),
         "controller": ("collect", "train-vae", "encode", "train-mdn")}
DOMAINS = ("choice", "uniform", "loguniform", "randint")


class SweepInterrupted(RuntimeError):
    """Tune stopped before every trial finished (e.g. Ctrl-C); the sweep can be resumed."""


@dataclass
class SchedulerConfig:
    type: Literal["asha", "pbt", "fifo"] = "asha"
    max_t: int = 10  # asha: epochs (vae, mdn) or generations (controller) at most
    grace_period: int = 1  # asha: the fewest a trial runs before it can be stopped
    reduction_factor: float = 2.0  # asha
    perturbation_interval: int = 4  # pbt: generations between exploit/explore steps
    quantile_fraction: float = 0.25  # pbt: the bottom fraction copies the top fraction
    resample_probability: float = 0.25  # pbt: resample from the space instead of x0.8/x1.2
    synch: bool = True  # pbt: exploit only once every trial reached the interval (reproducible)


@dataclass
class SweepConfig:
    stage: Literal["vae", "mdn", "controller"] = "vae"
    metric: str = "psnr_db"
    mode: Literal["max", "min"] = "max"
    num_samples: int = 4
    max_concurrent: int = 2
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    space: dict = field(default_factory=dict)  # config key -> {choice|uniform|loguniform|randint}
    resources: dict = field(default_factory=lambda: {"cpu": 1.0})  # per trial
    max_failures: int = 1  # a failed trial is retried from its checkpoint
    real_episodes: int = 16  # controller: real episodes that score the best trial
    seed: int = 0  # the search's draws, PBT's explore step and each trial's CMA-ES seed


@dataclass
class Sweep:
    sweep: SweepConfig
    base: dict  # the resolved trial config before the search space is applied
    path: Path


def load_sweep(path: str | Path, overrides: list[str] = (),
               data_run: str | Path | None = None) -> Sweep:
    """Read a sweep YAML; `sweep.*` overrides change the sweep, other keys the trial config.

    With `data_run` (a finished run) the trials start from that run's config instead of `base:`,
    so their env, latent size and data settings match the data and models they share.
    """
    path = Path(path)
    data = read_yaml(path, "sweep file")
    if not isinstance(data, dict) or "sweep" not in data:
        raise ConfigError(f"{path}: expected a 'sweep:' block (stage, metric, space, scheduler)")
    sweep_data, base_name = data.pop("sweep"), data.pop("base", None)
    sweep = SweepConfig()
    try:
        merge(sweep, sweep_data, "sweep.")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    trial_sets = []
    for item in overrides:
        key, value = parse_set(item)
        if key.startswith("sweep.space."):  # space keys are dotted config keys themselves
            sweep.space[key[len("sweep.space."):]] = value
        elif key.startswith("sweep."):
            merge(sweep, _nest(key[len("sweep."):], value), "sweep.")
        else:
            trial_sets.append(item)
    base_path = None
    if base_name:
        base_path = (path.parent / base_name) if not Path(base_name).is_absolute() else Path(base_name)
    if data_run is not None:
        saved = Path(data_run) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--data {data_run}: no config.yaml there; give a run directory made "
                              f"by `rayworld pipeline`")
        base = load_config(saved).to_dict()
    else:
        base = load_config(base_path).to_dict()
    try:
        cfg = load_config(overrides=trial_sets, base=deep_update(base, data))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    _check_space(sweep, cfg.to_dict(), path)
    return Sweep(sweep, cfg.to_dict(), path)


def _check_space(sweep: SweepConfig, base: dict, path: Path):
    if not sweep.space:
        raise ConfigError(f"{path}: 'sweep.space' is empty; give at least one config key")
    for key, spec in sweep.space.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
            raise ConfigError(f"{path}: sweep.space '{key}': expected one of "
                              f"{', '.join(DOMAINS)}, e.g. {{loguniform: [1e-4, 1e-2]}}")
        kind, arg = next(iter(spec.items()))
        if kind != "choice" and not (isinstance(arg, list) and len(arg) == 2):
            raise ConfigError(f"{path}: sweep.space '{key}': {kind} needs [low, high]")
        sample = float(arg[0]) if kind in ("uniform", "loguniform") else arg[0]
        try:
            with_values(base, {key: sample})
        except ConfigError as e:
            raise ConfigError(f"{path}: sweep.space: {e}") from None
    if sweep.scheduler.type == "pbt" and sweep.stage != "controller":
        raise ConfigError(f"{path}: sweep.scheduler.type 'pbt' is for stage 'controller'")
    if (sweep.scheduler.type == "pbt" and sweep.scheduler.synch
            and 0 < sweep.max_concurrent < sweep.num_samples):
        # a trial waiting at the interval stays live, so the rest could never start
        raise ConfigError(f"{path}: sweep.max_concurrent is {sweep.max_concurrent} but "
                          f"num_samples is {sweep.num_samples}; synchronous PBT waits for every "
                          "trial at each interval: raise max_concurrent to num_samples, or set "
                          "sweep.scheduler.synch=false")
    if sweep.stage == "controller" and base["evolve"]["generations"] < 1:
        raise ConfigError(f"{path}: evolve.generations is {base['evolve']['generations']}; "
                          "a controller sweep needs at least 1")
    if sweep.stage == "controller" and base["controller"]["kind"] == "mpc":
        raise ConfigError(f"{path}: controller.kind is 'mpc', a planner with nothing to evolve; "
                          "a controller sweep needs linear or mlp")


def _domain(spec: dict):
    from ray import tune

    kind, arg = next(iter(spec.items()))
    if kind == "choice":
        return tune.choice(list(arg))
    low, high = (float(a) for a in arg)
    if kind == "randint":
        return tune.randint(int(low), int(high) + 1)
    return tune.loguniform(low, high) if kind == "loguniform" else tune.uniform(low, high)


def _mutation(spec: dict):
    """What PBT perturbs: a choice as a list, so explore shifts it to a neighbouring value
    (Tune multiplies a tune.choice's value by 0.8 or 1.2, leaving the list: 8 -> 9.6)."""
    kind, arg = next(iter(spec.items()))
    return list(arg) if kind == "choice" else _domain(spec)


def _within(space: dict):
    """PBT's explore step scales a value by 0.8 or 1.2, which can leave the space (tau 1.3 ->
    1.56): clip it back to the space's bounds."""
    bounds = {k: [float(a) for a in arg] for k, spec in space.items()
              for kind, arg in spec.items() if kind != "choice"}

    def explore(config: dict) -> dict:
        for key, (low, high) in bounds.items():
            if key in config:
                value = min(max(config[key], low), high)
                config[key] = int(round(value)) if isinstance(config[key], int) else value
        return config
    return explore


def _hparams(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


# --- trials ---

def train_trial(config: dict):
    """A Tune trial that runs one Ray Train job (VAE or MDN-RNN) on the shared data."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from rayworld.train.mdn import train_mdn
    from rayworld.train.vae import train_vae

    cfg = with_values(config["_base"], _hparams(config))
    cfg.track.wandb, cfg.track.mlflow = False, ""  # Tune's logger callbacks track the trials
    stage = config["_stage"]
    run_dir = trial_run_dir(config.get("_out"), tune.get_context().get_trial_dir())
    data_run = Path(config["_data"])
    storage.refresh(data_run, "data")  # shared data in a bucket: this node's copy
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    if not (run_dir / "data").exists():  # read-only: every trial shares the same shards
        (run_dir / "data").symlink_to(data_run / "data", target_is_directory=True)
    if stage == "mdn":
        with atomic_path(run_dir / "checkpoints" / "vae.pt") as tmp:  # in a bucket: uploaded
            shutil.copy(data_run / "checkpoints" / "vae.pt", tmp)
    save_config(cfg, run_dir / "config.yaml")
    fn = train_vae if stage == "vae" else train_mdn
    fn(cfg, run_dir, log=print, callbacks=[TuneReportCallback()])


def trial_run_dir(out, trial_dir) -> Path:
    """Where a train trial keeps its run. A sweep in a bucket keeps it there too, under
    trials/: Ray Train's checkpoints, the weights and the event files reach every node."""
    trial_dir = Path(trial_dir)
    if out is not None and storage.mirror_of(out) is not None:
        return Path(out).resolve() / "trials" / trial_dir.name
    return trial_dir.resolve()


STATE = "cma_state.pkl"


REF_ROLLOUTS = 16  # dreams that score each trial's CMA-ES mean on the reference terms


def controller_trial(config: dict):
    """A Tune trial that is one CMA-ES run in the dream, reporting every generation.

    After a PBT exploit the trial restarts from another trial's checkpoint with perturbed
    hyperparameters: a new sigma scales the inherited step size by new/old; a new population
    size restarts CMA-ES at the inherited mean and step size (cma fixes popsize at creation).

    Besides its own fitness (`dream_return`, at the trial's own temperature and rollouts), each
    checkpoint scores the CMA-ES mean on terms that are the same for every trial: the base
    config's temperature and horizon, REF_ROLLOUTS fixed dreams (`dream_ref`). Returns at
    different temperatures do not compare, so ranking on `dream_return` favours easy dreams.
    """
    import ray
    import torch
    from ray import tune

    from rayworld.dream import BatchedDream, WorldModel, evaluate_population
    from rayworld.evolve import generation, new_strategy
    from rayworld.policies import make_controller

    cfg = with_values(config["_base"], _hparams(config))
    base = load_config(base=config["_base"]).evolve
    e = cfg.evolve
    hp = {"tau": e.tau, "sigma0": e.sigma0, "population": e.population, "rollouts": e.rollouts}
    threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    torch.set_num_threads(threads)
    storage.refresh(config["_data"], "data/series")  # shared data in a bucket: on this node
    world = WorldModel.load(Path(config["_data"]))
    n_out = world.action_n if world.discrete else world.action_dim
    template = make_controller(cfg, world.latent, world.hidden, n_out, world.discrete).eval()
    dream = BatchedDream(world, e.tau, e.max_steps, e.dropout, e.done, e.ensemble)
    ref_dream = BatchedDream(world, base.tau, base.max_steps, base.dropout, base.done,
                             base.ensemble)
    ckpt = tune.get_checkpoint()
    history = {"dream_mean": [], "dream_best": [], "dream_ref": []}
    if ckpt is not None:
        with ckpt.as_directory() as d:
            saved = pickle.loads((Path(d) / STATE).read_bytes())  # our own file, written below
        es, gen, history = saved["es"], saved["generation"], saved["history"]
        history.setdefault("dream_ref", [])
        ref = saved.get("ref")
        old = saved["hp"]
        if hp["population"] != old["population"]:
            es = new_strategy(es.mean, e, cfg.seed + gen + 1,
                              sigma0=es.sigma * hp["sigma0"] / old["sigma0"])
        elif hp["sigma0"] != old["sigma0"]:
            es.sigma *= hp["sigma0"] / old["sigma0"]
    else:
        x0 = np.zeros(template.num_params)
        if e.init == "clone":  # seeded: every trial starts from the same clone
            from rayworld.clone import clone_params

            x0 = clone_params(Path(config["_data"]), cfg, log=lambda _: None)
        es = new_strategy(x0, e, cfg.seed + 1)
        gen = 0
        ref = np.asarray(x0, np.float64)  # evolve.anchor's reference: where the trial began
    # PBT copies a donor's config and CMA-ES state: mix in this trial's id so the copy
    # samples its own candidates and dreams from here on.
    trial_id = tune.get_context().get_trial_id()  # "<experiment>_<index>": the index is stable
    trial_seed = zlib.crc32(f"{config.get('_sweep_seed', 0)}-{trial_id.rsplit('_', 1)[-1]}".encode()) \
        % 1_000_003
    np.random.seed((cfg.seed + trial_seed + gen) % 2**32)  # cma samples from numpy's global RNG
    interval = int(config["_checkpoint_every"])
    dream_ref = history["dream_ref"][-1] if history["dream_ref"] else None
    while gen < e.generations:
        t0 = time.perf_counter()
        seed = (cfg.seed + trial_seed) * 100_003 + gen
        xs, fitness = generation(es, lambda xs, seed=seed: evaluate_population(
            dream, template, xs, e.rollouts, seed, e.common_noise, ref_params=ref,
            anchor=e.anchor))
        gen += 1
        evals_per_s = len(xs) * e.rollouts / max(time.perf_counter() - t0, 1e-9)
        record("rayworld_dream_evals_per_s", evals_per_s, run=f"{cfg.name}-{trial_id}")
        history["dream_mean"].append(float(fitness.mean()))
        history["dream_best"].append(float(fitness.max()))
        saving = gen % interval == 0 or gen == e.generations
        if saving or dream_ref is None:  # the same dreams for every trial: seed fixed
            dream_ref = float(evaluate_population(ref_dream, template, es.mean[None],
                                                  REF_ROLLOUTS, cfg.seed + 7)[0])
            history["dream_ref"].append(dream_ref)
        metrics = {"generation": gen, "dream_return": float(fitness.mean()),
                   "dream_best": float(fitness.max()), "dream_ref": dream_ref,
                   "sigma": float(es.sigma), "evals_per_s": evals_per_s, **hp}
        if saving:
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / STATE).write_bytes(pickle.dumps(
                    {"es": es, "generation": gen, "history": history, "hp": hp,
                     "ref": ref}))
                torch.save({"params": torch.from_numpy(np.asarray(es.mean, np.float64)),
                            "generation": gen, "kind": cfg.controller.kind},
                           Path(d) / "controller.pt")
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(metrics)


# --- the sweep ---

def _scheduler(s: SweepConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from rayworld.pbt import SeededPBT

    sc = s.scheduler
    time_attr = "generation" if s.stage == "controller" else "epoch"
    if sc.type == "asha":
        return ASHAScheduler(time_attr=time_attr, max_t=sc.max_t, grace_period=sc.grace_period,
                             reduction_factor=sc.reduction_factor)
    if sc.type == "pbt":
        return SeededPBT(
            seed=s.seed, time_attr=time_attr, perturbation_interval=sc.perturbation_interval,
            hyperparam_mutations={k: _mutation(v) for k, v in s.space.items()},
            quantile_fraction=sc.quantile_fraction,
            resample_probability=sc.resample_probability,
            custom_explore_fn=_within(s.space), synch=sc.synch)
    return FIFOScheduler()


def _prepare_data(sw: Sweep, out: Path, data: Path | None, log) -> Path:
    """The run whose data (and models) every trial shares; builds it in `out` if not given."""
    from rayworld.pipeline import prepare, run_stage, status

    stage = sw.sweep.stage
    cfg = load_config(base=sw.base)
    run = Path(data) if data else out
    for need in NEEDS[stage]:
        st = status(need, cfg, run)
        if st.state == "done":
            continue
        if data:
            raise FileNotFoundError(f"--data {data}: {need} is {st.state} there"
                                    + (f" ({st.why})" if st.why else "") + "; run `rayworld "
                                    f"pipeline --out {data}` first, or leave out --data")
        log(f"rayworld tune: {need} for the shared data in {run}")
        if prepare(need, cfg, run, skip_done=True, log=log, st=st):
            run_stage(need, cfg, run)
    return run.resolve()


def run_sweep(sw: Sweep, out: Path, data: Path | None = None, log=print) -> dict:
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    start = time.perf_counter()
    s = sw.sweep
    out = Path(out).resolve()
    for d in ("data", "checkpoints", "tensorboard", "images"):
        (out / d).mkdir(parents=True, exist_ok=True)
    save_config(load_config(base=sw.base), out / "config.yaml")
    atomic_write_text(out / "sweep.yaml", yaml.safe_dump(
        {"sweep": asdict(s), **sw.base}, sort_keys=False))
    data_run = _prepare_data(sw, out, data, log)

    controller = s.stage == "controller"
    trainable = controller_trial if controller else train_trial
    resources = {k.lower(): float(v) for k, v in s.resources.items()}
    trainable = tune.with_resources(trainable, resources)
    if controller:
        checkpoint_every = s.scheduler.perturbation_interval if s.scheduler.type == "pbt" else 5
    else:
        checkpoint_every = 1
    space = {k: _domain(v) for k, v in s.space.items()}
    space.update({"_base": sw.base, "_stage": s.stage, "_data": str(data_run), "_out": str(out),
                  "_checkpoint_every": checkpoint_every, "_sweep_seed": s.seed})
    # in a bucket, Tune keeps its trials and checkpoints there (every node reaches them)
    where = storage.remote(out / "tune")
    exp = f"{where}/sweep"
    if tune.Tuner.can_restore(exp):
        log(f"rayworld tune: resuming the sweep in {exp}")
        tuner = tune.Tuner.restore(exp, trainable=trainable, param_space=space,
                                   resume_errored=True, resume_unfinished=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(
                metric=s.metric, mode=s.mode, scheduler=_scheduler(s),
                # Tune ignores max_concurrent_trials beside a search generator: give it here
                search_alg=BasicVariantGenerator(random_state=s.seed,
                                                 max_concurrent=s.max_concurrent),
                num_samples=s.num_samples),
            run_config=tune.RunConfig(
                name="sweep", storage_path=where,
                failure_config=tune.FailureConfig(max_failures=s.max_failures),
                callbacks=tune_callbacks(load_config(base=sw.base), out) or None,
                # PBT restores a donor's checkpoint while the donor goes on: keep them all.
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=None if s.scheduler.type == "pbt" else 2)))
    grid = tuner.fit()
    finished = grid.num_terminated + grid.num_errors
    if len(grid) < s.num_samples or finished < len(grid):  # Ctrl-C: Tune returns early
        raise SweepInterrupted(
            f"sweep stopped with {finished} of {s.num_samples} trials finished; re-run the same "
            f"command to resume it")
    report = _summarise(grid, s, out, log)
    if controller and report.get("best_checkpoint"):
        report.update(_score_best_controller(sw, data_run, out, report["best_value"], log))
    report["wall_s"] = round(time.perf_counter() - start, 2)
    atomic_write_json(out / "sweep_report.json", report)
    log(f"rayworld tune: report in {out / 'sweep_report.json'}")
    return report


def _summarise(grid, s: SweepConfig, out: Path, log) -> dict:
    """The trials table, and the best trial's config and checkpoint copied to out/best."""
    time_attr = "generation" if s.stage == "controller" else "epoch"
    trials = []
    # Tune's result order varies between a run and its restore; trial names do not
    for r in sorted(grid, key=lambda r: Path(r.path).name):
        m = r.metrics or {}
        trials.append({"trial": Path(r.path).name, "status": "error" if r.error else "done",
                       time_attr: m.get(time_attr), s.metric: m.get(s.metric),
                       **{k: (r.config or {}).get(k) for k in s.space}})
    ok = [t for t in trials if isinstance(t[s.metric], (int, float)) and math.isfinite(t[s.metric])]
    if not ok:
        raise RuntimeError(f"no trial reported '{s.metric}'; see the trial logs under {out / 'tune'}")
    best = grid.get_best_result(metric=s.metric, mode=s.mode, scope="last")
    value = (best.metrics or {}).get(s.metric)
    log(f"rayworld tune: {len(trials)} trials, best {s.metric} {value:.4g} "
        f"({Path(best.path).name})")
    for t in sorted(ok, key=lambda t: t[s.metric], reverse=s.mode == "max"):
        log("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in t.items()))
    best_dir = out / "best"
    tmp = out / "best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    hp = {k: best.config[k] for k in s.space}
    trial = Path(best.path) if s.stage == "controller" else trial_run_dir(out, best.path)
    trial_cfg = trial / "config.yaml"
    if trial_cfg.exists():
        shutil.copy(trial_cfg, tmp / "config.yaml")
    else:
        save_config(with_values(best.config["_base"], hp), tmp / "config.yaml")
    ckpt_path = _best_checkpoint(best, s, trial)
    if ckpt_path and s.stage == "controller":  # Tune's checkpoint, maybe in a bucket
        best.checkpoint.to_directory(str(tmp / "checkpoint"))
    elif ckpt_path:  # Ray Train's, maybe in a bucket
        from ray.train import Checkpoint

        Checkpoint(ckpt_path).to_directory(str(tmp / "checkpoint"))
    shutil.rmtree(best_dir, ignore_errors=True)
    tmp.rename(best_dir)
    return {"stage": s.stage, "metric": s.metric, "mode": s.mode, "best_trial": Path(best.path).name,
            "best_value": value, "best_hparams": hp, "trials": trials,
            "best_checkpoint": str(best_dir / "checkpoint") if ckpt_path else None}


def _best_checkpoint(best, s: SweepConfig, trial: Path) -> str | None:
    if s.stage == "controller":
        return best.checkpoint.path if best.checkpoint else None
    path = (best.metrics or {}).get("checkpoint_path")  # forwarded by TuneReportCallback
    if path and (storage.is_uri(path) or Path(path).exists()):
        return path
    from rayworld.train.common import last_checkpoint_dir

    found = last_checkpoint_dir(trial, s.stage)
    if found == "none yet" or not (storage.mirror_of(found) or Path(found).exists()):
        return None
    return storage.remote(found)


def _score_best_controller(sw: Sweep, data_run: Path, out: Path, dream_return: float,
                           log) -> dict:
    """The best trial's CMA-ES mean, scored in the real env next to its dream return."""
    import torch

    from rayworld.evaluate import play_real, return_stats

    s = sw.sweep
    best_cfg = load_config(out / "best" / "config.yaml") if (out / "best" / "config.yaml").exists() \
        else load_config(base=sw.base)
    state = torch.load(out / "best" / "checkpoint" / "controller.pt", weights_only=True)
    params = state["params"].double().numpy()
    with atomic_path(out / "best" / "controller.pt") as tmp:
        torch.save(state, tmp)
    n = s.real_episodes
    real = play_real(data_run, best_cfg, {"best trial": params}, n,
                     name="sweep-real-evaluator")["best trial"]
    fig = {**return_stats(real, "real_return"),
           "real_episodes": n, "best_generation": int(state["generation"])}
    log(f"rayworld tune: best controller, real return {fig['real_return_mean']:.2f} +/- "
        f"{fig['real_return_std']:.2f} over {n} episodes (dream return "
        f"{dream_return:.2f})")
    return fig
