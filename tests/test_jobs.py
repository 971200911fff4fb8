"""`ray job submit` against a real head node (`ray start --head`), the way the README shows it.

The module starts its own head with its own temp dir and ports (authentication off, as for a
local head), submits a tiny `rayworld pipeline` with `--working-dir .`, and while it runs reads
the head's metrics endpoint and actor list. The head is stopped by killing only its own
processes (`ray stop` would also stop the test session's Ray), and the test fails if any is left.
"""

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ray_start_cmd, stop_processes_naming

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("rayworld_env_steps", "rayworld_frames_written", "rayworld_train_loss",
           "rayworld_dream_evals_per_s", "rayworld_best_return")
TINY_JOB = ["collect.episodes=8", "collect.max_steps=60", "vae.epochs=1", "vae.batch_size=32",
            "mdn.epochs=1", "mdn.seq_len=16", "mdn.batch_size=8", "mdn.hidden=32",
            "ray.cpus_per_worker=1", "evolve.generations=3", "evolve.population=4",
            "evolve.rollouts=2", "evolve.max_steps=40", "evolve.real_every=3",
            "evolve.real_episodes=1", "evaluate.episodes=2", "evaluate.max_steps=60"]


def _env() -> dict:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               RAY_metrics_report_interval_ms="1000", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def head():
    import psutil

    temp = f"/tmp/rw-head-{os.getpid()}"  # short: Unix socket paths are limited to 107 bytes
    cmd, ports = ray_start_cmd(temp, 2, head=True)
    before = {p.pid for p in psutil.process_iter()}
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    yield {"dashboard": f"http://127.0.0.1:{ports['dashboard']}",
           "metrics": f"http://127.0.0.1:{ports['metrics']}/metrics"}
    assert not stop_processes_naming(temp, before), "the test head left processes running"
    shutil.rmtree(temp, ignore_errors=True)  # its logs and sockets


def _metrics(url: str) -> dict[str, float]:
    """rayworld's series on the endpoint: name (without _total) -> the sum over its tags."""
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return {}
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ray_rayworld_"):
            name = line.split("{")[0].split(" ")[0].removesuffix("_total")
            found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def _merge_max(seen: dict, new: dict):
    for k, v in new.items():
        seen[k] = max(seen.get(k, v), v)


def _actor_names(dashboard: str) -> set[str]:
    from ray.util.state import list_actors

    try:
        return {a.name for a in list_actors(address=dashboard, limit=1000,
                                             raise_on_missing_output=False) if a.name}
    except Exception:
        return set()


@pytest.mark.slow  # about 3.5 min: a `ray start` head, then the pipeline as a job
def test_job_submit_runs_the_pipeline_and_exports_metrics(head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "job-run"
    job_id = f"rayworld-test-{os.getpid()}"
    cmd = ["ray", "job", "submit", "--address", head["dashboard"], "--submission-id", job_id,
           "--working-dir", ".", "--", "rayworld", "pipeline", "--config",
           "tune_configs/quickstart.yaml", "--out", str(out)]
    for item in TINY_JOB:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen_metrics, seen_actors = {}, set()
    deadline = time.time() + 420
    while proc.poll() is None and time.time() < deadline:
        _merge_max(seen_metrics, _metrics(head["metrics"]))
        seen_actors |= _actor_names(head["dashboard"])
        time.sleep(1.0)
    if proc.poll() is None:
        proc.kill()
    log = proc.stdout.read()
    assert proc.returncode == 0, log[-3000:]
    assert "rayworld pipeline: done" in log

    client = JobSubmissionClient(head["dashboard"])
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
    job_log = client.get_job_logs(job_id)
    assert "held-out PSNR" in job_log
    # the console shows rayworld's lines once each; Ray's chatter goes to the run's log file
    assert job_log.count("vae epoch 1/1: loss") == 1
    assert "mdn epoch 1/1: nll" in job_log
    for chatter in ("Reporting training result", "Checkpoint successfully created",
                    "RayTrainWorker pid"):
        assert chatter not in job_log
    assert "Reporting training result" in (out / "logs" / "ray.log").read_text()
    assert (out / "checkpoints" / "controller.pt").exists()
    assert (out / "report.json").exists()

    for _ in range(10):  # the last reports of short-lived actors arrive a little later
        missing = {f"ray_{m}" for m in METRICS} - set(seen_metrics)
        if not missing:
            break
        time.sleep(1.0)
        _merge_max(seen_metrics, _metrics(head["metrics"]))
    assert not missing, f"metrics not exported: {sorted(missing)}; seen {sorted(seen_metrics)}"
    frames = json.loads((out / "report.json").read_text())["frames_collected"]
    assert 0 < seen_metrics["ray_rayworld_frames_written"] <= frames
    assert 0 < seen_metrics["ray_rayworld_env_steps"] <= frames
    assert seen_metrics["ray_rayworld_train_loss"] > 0
    assert seen_metrics["ray_rayworld_dream_evals_per_s"] > 0

    seen_actors |= _actor_names(head["dashboard"])  # dead actors are listed too
    for name in ("collector-0", "dream-evaluator-0", "real-evaluator-0"):
        assert name in seen_actors, sorted(seen_actors)
