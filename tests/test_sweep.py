"""`rayworld tune`: ASHA over real Ray Train trials, PBT over CMA-ES runs in the dream, restore.

The trials share the session's tiny pipeline run (`--data`), so no stage is redone here.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from rayworld.cli import main
from rayworld.config import ConfigError, load_config
from rayworld.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
VAE_TINY = ["sweep.num_samples=2", "sweep.scheduler.max_t=2", "vae.epochs=2",
            "vae.batch_size=32", "ray.cpus_per_worker=0.9",
            "sweep.space.vae.latent={choice: [8, 16]}"]
PBT_TINY = ["sweep.num_samples=4", "sweep.max_concurrent=4", "sweep.resources={cpu: 0.5}",
            "sweep.scheduler.perturbation_interval=2", "evolve.generations=8",
            "evolve.max_steps=40", "sweep.space.evolve.population={choice: [4, 6]}",
            "sweep.space.evolve.rollouts={choice: [2, 3]}", "sweep.real_episodes=2",
            "evaluate.max_steps=60"]


@pytest.fixture(scope="module")
def ray_with_dashboard(ray_session):
    """Ray with its dashboard for this module, then the session's Ray again.

    When Tune stops a trial, Ray Train frees the trial's placement group through the State
    API, which the dashboard serves; without it the CPUs stay reserved and later trials wait.
    `rayworld tune` starts Ray with the dashboard for the same reason.
    """
    from conftest import start_ray

    ray_session.shutdown()
    start_ray(dashboard=True)
    yield ray_session
    ray_session.shutdown()
    start_ray()


@pytest.fixture(scope="module")
def data_run(tiny_run, ray_with_dashboard, tmp_path_factory):
    """A copy of the tiny run, brought up to date: earlier tests retrain its VAE in place."""
    import shutil

    run = tmp_path_factory.mktemp("sweepdata") / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("tensorboard", "images"))
    assert main(["pipeline", "--out", str(run)]) == 0
    return run


def _tune(config: str, out: Path, data: Path, sets: list[str]) -> int:
    args = ["tune", "--config", str(ROOT / "tune_configs" / config), "--out", str(out),
            "--data", str(data)]
    for item in sets:
        args += ["--set", item]
    return main(args)


def test_sweep_files_load_and_bad_keys_fail_with_one_line(tmp_path):
    for name, stage, metric in [("vae_asha.yaml", "vae", "psnr_db"),
                                ("mdn_asha.yaml", "mdn", "val_nll"),
                                ("controller_pbt.yaml", "controller", "dream_ref")]:
        sw = load_sweep(ROOT / "tune_configs" / name)
        assert (sw.sweep.stage, sw.sweep.metric) == (stage, metric)
        assert sw.base["name"] == "quickstart"
    sw = load_sweep(ROOT / "tune_configs/vae_asha.yaml", ["sweep.num_samples=3", "vae.lr=5e-4"])
    assert sw.sweep.num_samples == 3 and sw.base["vae"]["lr"] == 5e-4
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweep: {stage: vae, space: {vae.latnt: {choice: [8]}}}\n")
    with pytest.raises(ConfigError, match="'vae.latnt'"):
        load_sweep(bad)
    bad.write_text("sweep: {stage: vae\n")
    with pytest.raises(ConfigError, match=r"sweep file .*bad.yaml: not valid YAML"):
        load_sweep(bad)
    bad.write_text("sweep: {stage: vae, space: {vae.lr: {logunifrm: [1, 2]}}}\n")
    with pytest.raises(ConfigError, match="vae.lr.*expected one of choice"):
        load_sweep(bad)
    bad.write_text("sweep: {stage: vae, scheduler: {type: pbt}, space: {vae.lr: "
                   "{uniform: [1e-4, 1e-3]}}}\n")
    with pytest.raises(ConfigError, match="'pbt' is for stage 'controller'"):
        load_sweep(bad)
    with pytest.raises(ConfigError, match="max_concurrent is 2 but num_samples is 4; synchronous"):
        load_sweep(ROOT / "tune_configs/controller_pbt.yaml", ["sweep.max_concurrent=2"])
    sw = load_sweep(ROOT / "tune_configs/controller_pbt.yaml",
                    ["sweep.max_concurrent=2", "sweep.scheduler.synch=false"])
    assert sw.sweep.max_concurrent == 2
    with pytest.raises(ConfigError, match="evolve.generations is 0; a controller sweep needs"):
        load_sweep(ROOT / "tune_configs/controller_pbt.yaml", ["evolve.generations=0"])


def test_pbt_explore_stays_inside_the_search_space():
    """Tune's explore step scales by 0.8 or 1.2; the scheduler rayworld builds clips it."""
    import random

    from ray.tune.schedulers.pbt import _explore

    from rayworld.sweep import _scheduler

    sw = load_sweep(ROOT / "tune_configs/controller_pbt.yaml",
                    ["sweep.space.evolve.population={randint: [8, 24]}"])
    pbt = _scheduler(sw.sweep)
    random.seed(0)
    seen = {"evolve.tau": set(), "evolve.population": set(), "evolve.sigma0": set(),
            "evolve.rollouts": set()}
    for tau, population, sigma0 in [(1.3, 24, 0.3), (0.8, 8, 0.03)]:
        start = {"evolve.tau": tau, "evolve.population": population, "evolve.sigma0": sigma0,
                 "evolve.rollouts": 8}
        for _ in range(50):
            new, _ = _explore(start, pbt._hyperparam_mutations, 0.0, (1.2, 0.8),
                              pbt._custom_explore_fn)
            for key, value in new.items():
                seen[key].add(value)
    assert min(seen["evolve.tau"]) == pytest.approx(0.8) and \
        max(seen["evolve.tau"]) == pytest.approx(1.3)
    assert sorted(round(t, 6) for t in seen["evolve.tau"]) == [0.8, 0.96, 1.04, 1.3]
    assert seen["evolve.population"] == {8, 10, 19, 24}  # ints stay ints: 8x1.2 -> 10, 24x0.8 -> 19
    assert 0.03 <= min(seen["evolve.sigma0"]) and max(seen["evolve.sigma0"]) <= 0.3
    assert seen["evolve.rollouts"] == {4, 16}  # a choice shifts along its list


def test_pbt_draws_from_its_own_stream_whatever_else_draws():
    """PBT's explore and resample draws repeat for a sweep seed, however much the driver's
    other code draws from Python's and numpy's global RNGs in between, and leave those alone."""
    import random

    import numpy as np
    from ray.tune.schedulers.pbt import _explore

    from rayworld.sweep import _scheduler

    sw = load_sweep(ROOT / "tune_configs/controller_pbt.yaml", ["sweep.seed=3"])
    start = {"evolve.tau": 1.0, "evolve.population": 16, "evolve.sigma0": 0.1,
             "evolve.rollouts": 8}

    def draws(noise: int) -> list:
        pbt = _scheduler(sw.sweep)
        pbt._resample_probability = 0.5  # both kinds of draw: resample (numpy) and shift
        out = []
        for i in range(20):
            random.random(), np.random.random(noise + i)  # what else the driver draws
            outer = random.getstate(), np.random.get_state()
            out.append(pbt._own_random(_explore, start, pbt._hyperparam_mutations, 0.5,
                                       (1.2, 0.8), pbt._custom_explore_fn)[0])
            assert random.getstate() == outer[0]
            now = np.random.get_state()  # the key and the position within it
            assert (now[1] == outer[1][1]).all() and now[2:] == outer[1][2:]
        return out

    first = draws(noise=1)
    assert first == draws(noise=7)
    assert len({tuple(sorted(d.items())) for d in first}) > 5  # they do vary
    assert _scheduler(sw.sweep)._synch  # every trial at the interval before any is perturbed


@pytest.mark.slow  # about 3 min: an ASHA sweep of Ray Train trials, then its restore
def test_vae_asha_sweep_keeps_the_best_trial_and_restores(data_run, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "vae_sweep"
    mlruns = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert _tune("vae_asha.yaml", out, data_run, VAE_TINY + [f"track.mlflow={mlruns}"]) == 0
    report = json.loads((out / "sweep_report.json").read_text())
    # Tune's MLflowLoggerCallback: one MLflow run per trial, with every epoch's PSNR
    client = MlflowClient(mlruns)
    runs = client.search_runs([client.get_experiment_by_name("rayworld").experiment_id])
    assert len(runs) == 2
    assert sorted(r.data.metrics["psnr_db"] for r in runs) == \
        pytest.approx(sorted(t["psnr_db"] for t in report["trials"]))
    assert report["stage"] == "vae" and len(report["trials"]) == 2
    values = [t["psnr_db"] for t in report["trials"]]
    assert report["best_value"] == max(values) and 5 < report["best_value"] < 60
    # the best trial's config and Ray Train checkpoint were copied out
    best_cfg = load_config(out / "best" / "config.yaml")
    assert best_cfg.vae.latent == report["best_hparams"]["vae.latent"]
    assert best_cfg.vae.lr == pytest.approx(report["best_hparams"]["vae.lr"])
    state = torch.load(out / "best" / "checkpoint" / "state.pt", weights_only=True)
    assert state["model"]["fc_mu.weight"].shape[0] == best_cfg.vae.latent
    assert state["epoch"] == 2 and state["history"]["psnr_db"][-1] == pytest.approx(
        report["best_value"])
    # re-running the same --out restores the finished sweep instead of starting over
    capsys.readouterr()
    assert _tune("vae_asha.yaml", out, data_run, VAE_TINY + [f"track.mlflow={mlruns}"]) == 0
    assert "resuming the sweep" in capsys.readouterr().out
    again = json.loads((out / "sweep_report.json").read_text())
    assert [t["trial"] for t in again["trials"]] == [t["trial"] for t in report["trials"]]
    assert again["best_value"] == report["best_value"]


@pytest.mark.slow  # ~2 min: 4 PBT trials x 8 generations, then real episodes
def test_controller_pbt_exploits_and_scores_the_best_in_the_real_env(data_run, tmp_path):
    out = tmp_path / "pbt"
    assert _tune("controller_pbt.yaml", out, data_run, PBT_TINY) == 0
    report = json.loads((out / "sweep_report.json").read_text())
    assert report["stage"] == "controller" and len(report["trials"]) == 4
    assert all(t["generation"] == 8 for t in report["trials"]), report["trials"]
    assert isinstance(report["real_return_mean"], float) and report["real_episodes"] == 2
    assert report["best_value"] == max(t["dream_ref"] for t in report["trials"])
    # PBT copied strong runs into weak ones (Tune logs every exploit)
    exp = out / "tune" / "sweep"
    exploits = [ln for f in exp.glob("pbt_global.txt") for ln in f.read_text().splitlines()]
    assert exploits, "PBT never exploited"
    params = torch.load(out / "best" / "controller.pt", weights_only=True)["params"]
    assert params.ndim == 1 and torch.isfinite(params).all() and params.abs().sum() > 0


@pytest.mark.slow
def test_interrupted_sweep_resumes_with_tuner_restore(data_run, tmp_path):
    """Ctrl-C a running sweep in its own process, then re-run the same command."""
    out = tmp_path / "mdn_sweep"
    cmd = [sys.executable, "-m", "rayworld.cli", "tune", "--config",
           str(ROOT / "tune_configs/mdn_asha.yaml"), "--out", str(out), "--data", str(data_run)]
    for item in ["sweep.num_samples=3", "sweep.max_concurrent=1", "sweep.scheduler.max_t=3",
                 "sweep.scheduler.grace_period=3", "mdn.epochs=3", "ray.num_cpus=2",
                 "ray.cpus_per_worker=0.9", "mdn.seq_len=16", "mdn.batch_size=8"]:
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line)
    threading.Thread(target=read, daemon=True).start()
    # Tune keeps result.json in Ray's session directory until it syncs the experiment, so
    # wait on what the sweep prints: one trial at a time, so the first epoch 3/3 means one
    # trial is through and two are still to run
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any("mdn epoch 3/3:" in line for line in list(lines)):
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the sweep ended before it could be interrupted:\n" + \
        "".join(lines)[-3000:]
    # sweep.max_concurrent=1: the third trial waits for the second
    assert sum("started with configuration" in line for line in list(lines)) <= 2
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    assert not (out / "sweep_report.json").exists()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming the sweep" in proc.stdout
    report = json.loads((out / "sweep_report.json").read_text())
    assert len(report["trials"]) == 3 and all(t["epoch"] == 3 for t in report["trials"])
