"""Stage 6, evolve: CMA-ES (the `cma` library, ask/tell) of the controller.

Candidates are scored in the dream (`evolve.where: dream`, the default) or in the real env
(`real`: the paper's CarRacing protocol, the reference the dream's transfer is judged by). Each
generation's population is split across Ray actors; every actor holds the world model once and
scores its share in one batched dream (candidates x rollouts). All candidates of a generation
meet the same start latents and dream noise (or the same real seeds): common random numbers.

Every `real_every` generations the CMA-ES mean is scored on equal terms in the dream at the
real horizon and in the real env, so the dream-vs-real gap shows as it develops. The CMA-ES
state is saved after each generation; re-running the same run directory resumes from it.
"""

from __future__ import annotations

import copy
import pickle
import time
from pathlib import Path

import numpy as np
import ray
import torch

from rayworld import storage
from rayworld.actors import close_and_kill, keep_busy
from rayworld.config import Config
from rayworld.evaluate import RealRunner, run_episodes
from rayworld.io import atomic_path
from rayworld.policies import CONTROLLER, check_world_model
from rayworld.telemetry import record
from rayworld.track import Tracker

STATE = "evolve_state.pkl"


DREAM_CHECK_ROLLOUTS = 32  # dreams that score the CMA-ES mean at each real check


class EvolveWorker(RealRunner):
    """A real-env runner that also scores candidates in the batched dream."""

    def __init__(self, run_dir: str, cfg_dict: dict, worker_index: int = 0):
        from rayworld.dream import BatchedDream

        super().__init__(run_dir, cfg_dict, worker_index)
        e = self.cfg.evolve
        # The dream runs on the GPU when Ray gave this actor one; real episodes stay on CPU.
        device = "cuda" if self.cfg.ray.use_gpu and torch.cuda.is_available() else "cpu"
        self.check_dream = BatchedDream(self.world.to(device), e.tau, e.max_steps, e.dropout,
                                        e.done, e.ensemble)
        self.dream = self.check_dream
        if e.start == "data":
            world = self.world.with_data_starts(Path(run_dir), e.start_states, self.cfg.seed,
                                                sample=self.cfg.controller.z == "sample")
            self.dream = BatchedDream(world.to(device), e.tau, e.max_steps, e.dropout, e.done,
                                      e.ensemble)
        self.dream_template = copy.deepcopy(self.controller).to(device)

    def num_params(self) -> int:
        return self.controller.num_params

    def dream_returns(self, params: np.ndarray, rollouts: int, seed: int,
                      max_steps: int | None = None, ref: np.ndarray | None = None,
                      first: bool = False) -> np.ndarray:
        """Mean dream return per candidate; with `ref`, less the anchor's cost (fitness).
        first: dreams from the episodes' first frames whatever evolve.start says (the checks)."""
        from rayworld.dream import evaluate_population

        e = self.cfg.evolve
        dream = self.check_dream if first else self.dream
        return evaluate_population(dream, self.dream_template, params, rollouts, seed,
                                   e.common_noise, max_steps, ref, e.anchor)

    def real_returns(self, params: np.ndarray, rollouts: int, seed: int,
                     max_steps: int | None = None) -> np.ndarray:
        """Mean real return per candidate over the same `rollouts` env seeds."""
        seeds = [seed + i for i in range(rollouts)]
        steps = max_steps or self.cfg.evaluate.max_steps
        return np.array([np.mean([self.episode(p, s, steps) for s in seeds]) for p in params])


def _score(workers, params: np.ndarray, rollouts: int, seed: int, log,
           where: str = "dream", ref: np.ndarray | None = None) -> np.ndarray:
    """Fitness of every candidate; a share whose actor died is redone by another."""
    method = "dream_returns" if where == "dream" else "real_returns"
    extra = {"ref": ref} if ref is not None else {}  # the anchor: a dream cost only
    shares = [s for s in np.array_split(np.arange(len(params)), len(workers)) if len(s)]
    names = {id(w): f"dream-evaluator-{i}" for i, w in enumerate(workers)}
    fitness = np.empty(len(params))

    def submit(worker, share):
        return getattr(worker, method).remote(params[share], rollouts, seed, **extra)

    def died(worker, share):
        log(f"evolve: {names[id(worker)]} died; its {len(share)} candidates go to another "
            f"evaluator")

    for share, done in keep_busy(workers, shares, submit, on_death=died):
        fitness[share] = ray.get(done)
    return fitness


def _check(workers, mean, cfg: Config, real_seeds, hist: dict, writer, gen: int):
    """The CMA-ES mean on equal terms: the same horizon in the dream and the real env."""
    horizon = cfg.evaluate.max_steps
    dm = float(ray.get(workers[0].dream_returns.remote(
        mean[None], DREAM_CHECK_ROLLOUTS, cfg.seed + 7, horizon, first=True))[0])
    rm = float(run_episodes(workers, mean, real_seeds, horizon).mean())
    record("rayworld_best_return", max(hist["real_mean"] + [rm]), run=cfg.name, where="real")
    hist["real_gen"].append(gen)
    hist["real_mean"].append(rm)
    hist["dream_check"].append(dm)
    writer.add_scalar("evolve/real_mean", rm, gen)
    writer.add_scalar("evolve/dream_check", dm, gen)
    return dm, rm


def new_strategy(x0: np.ndarray, e, seed: int, sigma0: float | None = None,
                 population: int | None = None):
    """CMA-ES at x0 with evolve's options (`cma` samples from numpy's global RNG)."""
    import cma

    opts = {"popsize": population or e.population, "seed": seed, "verbose": -9}
    if e.diagonal:
        opts["CMA_diagonal"] = True
    return cma.CMAEvolutionStrategy(x0, e.sigma0 if sigma0 is None else sigma0, opts)


def generation(es, score) -> tuple[np.ndarray, np.ndarray]:
    """One generation: ask, score every candidate (higher is better), tell."""
    xs = np.asarray(es.ask())
    fitness = np.asarray(score(xs), np.float64)
    es.tell(list(xs), list(-fitness))  # cma minimises
    return xs, fitness


def _save_controller(ckpt: Path, mean, generation: int, cfg: Config):
    with atomic_path(ckpt / CONTROLLER) as tmp:  # the CMA-ES mean: the robust pick
        torch.save({"params": torch.from_numpy(np.asarray(mean, np.float64)),
                    "generation": generation, "kind": cfg.controller.kind}, tmp)


def _save_state(path: Path, data: dict):
    with atomic_path(path) as tmp:
        tmp.write_bytes(pickle.dumps(data))


def evolve(cfg: Config, run_dir: Path, log=print) -> dict:
    from rayworld.images import save_dream_vs_real
    from rayworld.train.common import tb_writer

    start = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    e = cfg.evolve
    ckpt = run_dir / "checkpoints"
    if cfg.controller.kind == "mpc":
        check_world_model(run_dir)
        saved = ckpt / CONTROLLER  # a record that evaluate and collect read; torch.save
        if not saved.exists() or torch.load(saved, weights_only=True).get("kind") != "mpc":
            _save_controller(ckpt, np.zeros(0), 0, cfg)  # never writes the same bytes twice
        log("evolve: controller.kind mpc plans in the dream at every real step; nothing to "
            "evolve")
        return {"generations": 0, "evolve_where": "nowhere: controller.kind mpc plans",
                **dict.fromkeys(("dream_return_best", "dream_return_last_mean",  # stale
                                 "dream_return_final", "dream_return_final_horizon",
                                 "evolve_real_return_mean_params")),
                "wall_s": time.perf_counter() - start}
    state_path = ckpt / STATE
    check_world_model(run_dir)
    if state_path.exists():
        saved = _load_state(state_path)  # before any actor starts: a damaged file is one line
    x0 = None
    if e.init == "clone" and not state_path.exists():  # before any actor: errors are one line
        from rayworld.clone import clone_params

        x0 = clone_params(run_dir, cfg, log)
    n_workers = e.num_actors or max(1, int(ray.available_resources().get("CPU", 1)))
    gpus = e.gpus_per_actor if cfg.ray.use_gpu else 0
    cls = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=3, max_task_retries=0)(EvolveWorker)
    workers = [cls.options(name=f"dream-evaluator-{i}", scheduling_strategy="SPREAD")
               .remote(str(run_dir), cfg.to_dict(), worker_index=i) for i in range(n_workers)]
    num_params = ray.get(workers[0].num_params.remote())
    if state_path.exists():
        if saved["num_params"] != num_params:
            raise ValueError(f"{state_path}: controller has {saved['num_params']} parameters, "
                             f"config gives {num_params}; use another --out")
        es, gen0, hist = saved["es"], saved["generation"], saved["history"]
        log(f"evolve: resuming after generation {gen0}")
    else:
        es = new_strategy(np.zeros(num_params) if x0 is None else x0, e, cfg.seed + 1)
        gen0, hist = 0, {k: [] for k in ("dream_best", "dream_mean", "dream_worst", "real_gen",
                                         "real_mean", "dream_check")}
    writer = tb_writer(run_dir, "evolve")
    tracker = None
    real_seeds = [cfg.evaluate.seed + 10_000 + i for i in range(e.real_episodes)]
    horizon = cfg.evaluate.max_steps
    where = "scored in the dream" if e.where == "dream" else "scored in the real env"
    log(f"evolve: {num_params} parameters, population {e.population} x {e.rollouts} rollouts, "
        f"{where}")
    # the anchor holds candidates to CMA-ES's start (cma keeps it as x0, so a resume has it)
    anchor_ref = np.asarray(es.x0, np.float64) if e.anchor > 0 else None
    try:
        tracker = Tracker.open(cfg, run_dir, "evolve")
        if gen0 == 0:
            if e.init == "clone" and e.real_episodes:  # what cloning alone gives
                dm, rm = _check(workers, es.mean, cfg, real_seeds, hist, writer, 0)
                log(f"evolve gen 0 (cloned): CMA-ES mean, {horizon} steps: dream {dm:.2f} "
                    f"real {rm:.2f}")
            _save_controller(ckpt, es.mean, 0, cfg)  # evolve.generations 0 keeps the start
        for gen in range(gen0, e.generations):
            t0 = time.perf_counter()
            seed = (cfg.seed * 100_003 + gen) if e.where == "dream" else \
                1_000_000 + cfg.seed * 100_003 + gen * e.rollouts
            xs, fitness = generation(es, lambda xs, seed=seed: _score(
                workers, xs, e.rollouts, seed, log, e.where, anchor_ref))
            best = int(np.argmax(fitness))
            record("rayworld_dream_evals_per_s",
                   len(xs) * e.rollouts / (time.perf_counter() - t0), run=cfg.name)
            record("rayworld_best_return", max(hist["dream_best"] + [float(fitness[best])]),
                   run=cfg.name, where=e.where)
            hist["dream_best"].append(float(fitness[best]))
            hist["dream_mean"].append(float(fitness.mean()))
            hist["dream_worst"].append(float(fitness.min()))
            what = "dream fitness (return - anchor cost)" if anchor_ref is not None else e.where
            line = (f"evolve gen {gen + 1}/{e.generations}: {what} best {fitness[best]:.2f} "
                    f"mean {fitness.mean():.2f} worst {fitness.min():.2f}")
            for k in ("dream_best", "dream_mean", "dream_worst"):
                writer.add_scalar(f"evolve/{k}", hist[k][-1], gen + 1)
            writer.add_scalar("evolve/sigma", es.sigma, gen + 1)
            last_gen = gen + 1 == e.generations
            if e.real_episodes and ((gen + 1) % e.real_every == 0 or last_gen):
                dm, rm = _check(workers, es.mean, cfg, real_seeds, hist, writer, gen + 1)
                line += f" | CMA-ES mean, {horizon} steps: dream {dm:.2f} real {rm:.2f}"
            writer.flush()
            storage.publish(run_dir, "tensorboard/evolve")  # watchable in a bucket too
            if tracker is not None:
                row = {f"evolve/{k}": hist[k][-1] for k in ("dream_best", "dream_mean",
                                                             "dream_worst")}
                if hist["real_gen"] and hist["real_gen"][-1] == gen + 1:
                    row |= {"evolve/real_mean": rm, "evolve/dream_check": dm}
                tracker.log(row | {"evolve/sigma": es.sigma}, gen + 1)
            log(f"{line} ({time.perf_counter() - t0:.1f} s)")
            _save_controller(ckpt, es.mean, gen + 1, cfg)
            _save_state(state_path, {"es": es, "generation": gen + 1, "history": hist,
                                     "num_params": num_params})
            save_dream_vs_real(hist, run_dir / "images" / "evolve_curves.png", horizon)
    finally:
        writer.close()
        if tracker is not None:
            tracker.close()
        close_and_kill(workers)
    figures = {"dream_return_best": max(hist["dream_best"]) if hist["dream_best"] else None,
               "dream_return_last_mean": hist["dream_mean"][-1] if hist["dream_mean"] else None,
               "generations": len(hist["dream_best"]), "evolve_where": e.where,
               "wall_s": time.perf_counter() - start}
    if hist["real_mean"]:
        figures["evolve_real_return_mean_params"] = hist["real_mean"][-1]
        figures["dream_return_final"] = hist["dream_check"][-1]
        figures["dream_return_final_horizon"] = horizon
    return figures


def _load_state(path: Path) -> dict:
    """The saved CMA-ES state; damaged, one line says to start evolve afresh."""
    try:
        saved = pickle.loads(path.read_bytes())  # our own file, written by _save_state
        if not isinstance(saved, dict) or not {"es", "generation", "history"} <= set(saved):
            raise ValueError("not an evolve state")
        saved["history"].setdefault("dream_check", [None] * len(saved["history"]["real_mean"]))
        return saved
    except Exception as e:  # pickle raises many kinds on a damaged file
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} is corrupt or truncated ({why}); delete it to restart "
                         "`rayworld evolve` from generation 0") from None
