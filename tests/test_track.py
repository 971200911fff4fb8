"""W&B and MLflow for real: a local `mlflow server` started here, and W&B offline run files.

A copy of the tiny run re-trains its MDN-RNN (a changed key makes it stale), evolves and
evaluates with both trackers on; the metrics are read back through MLflow's client and from
the W&B run's own `.wandb` file (a LevelDB-style log of protobuf records).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_ports

from rayworld.cli import main


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` in its own process group; stopped whole, even if it never came
    up (a fresh environment compiles mlflow's modules on the first start, which takes a while
    on a busy 2-core machine)."""
    import psutil

    (port,) = free_ports(1)
    store = tmp_path / "mlflow"
    store.mkdir()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job workers
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store / 'db.sqlite'}",
         "--default-artifact-root", str(store / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(store / "server.log", "w"), env=env,
        start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, (store / "server.log").read_text()[-2000:]
                assert time.time() < deadline, "mlflow server did not come up in 300 s"
                time.sleep(0.5)
        yield uri
    finally:
        group = [p for p in psutil.process_iter() if _pgid(p) == proc.pid]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            _, group = psutil.wait_procs(group, timeout=15)
            if not group:
                break
        proc.wait(timeout=15)
        assert not [p for p in psutil.process_iter() if _pgid(p) == proc.pid], \
            "mlflow left processes running"


def _pgid(p) -> int | None:
    """The process group of a live process (None once it is gone or a zombie)."""
    import psutil

    try:
        return None if p.status() == psutil.STATUS_ZOMBIE else os.getpgid(p.pid)
    except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
        return None


def _wandb_history(run_file: Path) -> tuple[dict, list[dict]]:
    """The run record and every history row of one offline W&B run file."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, partial = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            chunks.append(partial + chunk)
    run, rows = {}, []
    for raw in chunks:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = {"name": rec.run.display_name, "group": rec.run.run_group,
                   "job_type": rec.run.job_type}
        elif kind == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in rec.history.item})
    return run, rows


@pytest.mark.slow  # about 2 min: an MLflow server and every stage
def test_stages_log_to_mlflow_and_wandb_offline(tiny_run, tmp_path, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "tracked"
    shutil.copytree(tiny_run, run)
    assert main(["pipeline", "--out", str(run)]) == 0  # up to date, whatever came before
    assert main(["pipeline", "--out", str(run), "--set", "mdn.lr=0.002",
                 "--set", f"track.mlflow={mlflow_server}", "--set", "track.wandb=true"]) == 0

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("rayworld")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"tracked-train-mdn", "tracked-evolve", "tracked-evaluate"}
    mdn = runs["tracked-train-mdn"]
    assert [m.step for m in client.get_metric_history(mdn.info.run_id, "mdn/val_nll")] == [1, 2]
    assert mdn.data.params["mdn.lr"] == "0.002"
    assert mdn.data.tags["rayworld.stage"] == "train-mdn"
    evo = client.get_metric_history(runs["tracked-evolve"].info.run_id, "evolve/dream_mean")
    assert [m.step for m in evo] == list(range(1, 7))
    real = client.get_metric_history(runs["tracked-evolve"].info.run_id, "evolve/real_mean")
    assert [m.step for m in real] == [3, 6]
    report = json.loads((run / "report.json").read_text())
    got = runs["tracked-evaluate"].data.metrics["evaluate/real_return_mean"]
    assert got == pytest.approx(report["real_return_mean"])

    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    found = {}
    for f in files:
        info, rows = _wandb_history(f)
        found[info["job_type"]] = (info, rows)
    assert set(found) == {"train-mdn", "evolve", "evaluate"}
    info, rows = found["train-mdn"]
    assert info["group"] == "tracked" and info["name"] == "tracked-train-mdn"
    assert [r["_step"] for r in rows if "mdn/val_nll" in r] == [1, 2]
    assert rows[-1]["mdn/val_nll"] == pytest.approx(
        client.get_metric_history(mdn.info.run_id, "mdn/val_nll")[-1].value, rel=1e-6)
    assert [r["_step"] for r in found["evolve"][1] if "evolve/dream_mean" in r] == \
        list(range(1, 7))
