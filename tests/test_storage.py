"""Run directories in object storage, against a real S3 server (moto) started here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "rw-test"
SMALL = ["collect.episodes=4", "collect.max_steps=50", "vae.epochs=2", "vae.batch_size=32",
         "mdn.epochs=1", "mdn.seq_len=16", "mdn.batch_size=8", "mdn.hidden=32",
         "ray.cpus_per_worker=1", "ray.num_cpus=2", "ray.object_store_mb=150",
         "evolve.generations=2", "evolve.population=4", "evolve.rollouts=2",
         "evolve.max_steps=30", "evolve.real_every=2", "evolve.real_episodes=1",
         "evaluate.episodes=2", "evaluate.max_steps=40"]


@pytest.fixture(scope="module")
def s3():
    """A real S3 endpoint on loopback, with one bucket; stopped (with its thread) at the end."""
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    try:
        yield boto3.client("s3")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _objects(client, prefix: str) -> dict:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"][len(prefix):]: o for p in pages for o in p.get("Contents", [])}


def _cli(args, mirror: Path, timeout=600, popen=False):
    env = dict(os.environ, RAYWORLD_MIRROR=str(mirror), RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1", SDL_VIDEODRIVER="dummy")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "rayworld.cli", *args]
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _sets(items):
    return [a for item in items for a in ("--set", item)]


def test_mirror_uploads_whole_objects_and_pulls_only_what_differs(s3, tmp_path, monkeypatch):
    from rayworld import storage
    from rayworld.io import atomic_path, atomic_write_text

    monkeypatch.setenv("RAYWORLD_MIRROR", str(tmp_path / "a"))
    monkeypatch.delenv(storage.ENV, raising=False)
    uri = f"s3://{BUCKET}/unit/run"
    local = storage.attach(uri)
    assert local == tmp_path / "a" / "s3" / BUCKET / "unit" / "run"
    atomic_write_text(local / "data" / "manifest.json", '{"shards": {}}')
    with pytest.raises(KeyError), atomic_path(local / "checkpoints" / "vae.pt") as tmp:
        tmp.write_bytes(b"half a checkpoint")
        raise KeyError("killed mid-write")
    got = _objects(s3, "unit/run/")
    assert set(got) == {"data/manifest.json"}  # the failed write left no object, no temp name
    body = s3.get_object(Bucket=BUCKET, Key="unit/run/data/manifest.json")["Body"].read()
    assert body == b'{"shards": {}}'

    # another machine: its own mirror, filled from the bucket; Ray Train's folders stay there
    s3.put_object(Bucket=BUCKET, Key="unit/run/checkpoints/vae/checkpoint_1/state.pt", Body=b"x")
    s3.put_object(Bucket=BUCKET, Key="unit/run/images/vae_recon.png", Body=b"png")
    monkeypatch.setenv("RAYWORLD_MIRROR", str(tmp_path / "b"))
    other = storage.attach(uri)
    assert (other / "data" / "manifest.json").read_text() == '{"shards": {}}'
    assert (other / "images" / "vae_recon.png").read_bytes() == b"png"
    assert not (other / "checkpoints" / "vae").exists()
    storage.refresh(other, "checkpoints/vae")  # named on purpose: pulled
    assert (other / "checkpoints" / "vae" / "checkpoint_1" / "state.pt").read_bytes() == b"x"

    # a changed object replaces the copy; an unchanged one is not downloaded again
    stamp = os.stat(other / "images" / "vae_recon.png").st_mtime_ns
    os.utime(other / "images" / "vae_recon.png", ns=(stamp, stamp))
    s3.put_object(Bucket=BUCKET, Key="unit/run/data/manifest.json", Body=b'{"shards": {"0": 1}}')
    before = os.stat(other / "images" / "vae_recon.png").st_ino
    storage.refresh(other)
    assert (other / "data" / "manifest.json").read_text() == '{"shards": {"0": 1}}'
    assert os.stat(other / "images" / "vae_recon.png").st_ino == before
    # a file written in place (an event file) goes up with publish
    (other / "tensorboard" / "vae").mkdir(parents=True)
    (other / "tensorboard" / "vae" / "events.out").write_bytes(b"e1")
    storage.publish(other, "tensorboard")
    assert "tensorboard/vae/events.out" in _objects(s3, "unit/run/")
    assert storage.remote(other / "data" / "manifest.json") == f"{uri}/data/manifest.json"
    # a worker pulls only its share of the shards
    for e in range(3):
        s3.put_object(Bucket=BUCKET, Key=f"unit/run/data/episodes/ep-{e}.parquet", Body=b"s")
    storage.refresh_files([other / "data" / "episodes" / "ep-1.parquet"])
    assert sorted(p.name for p in (other / "data" / "episodes").iterdir()) == ["ep-1.parquet"]

    # a sweep trial's run: its Ray Train folders stay in the bucket on a whole pull, and its
    # link to the shared data is not followed when the run is published
    s3.put_object(Bucket=BUCKET, Key="unit/run/trials/t0/checkpoints/mdn/checkpoint_1/s.pt",
                  Body=b"x")
    (other / "trials" / "t0").mkdir(parents=True)
    (other / "trials" / "t0" / "data").symlink_to(other / "data", target_is_directory=True)
    (other / "trials" / "t0" / "config.yaml").write_text("seed: 0")
    storage.refresh(other)
    assert not (other / "trials" / "t0" / "checkpoints").exists()
    storage.publish(other)
    got = set(_objects(s3, "unit/run/trials/"))
    assert got == {"t0/checkpoints/mdn/checkpoint_1/s.pt", "t0/config.yaml"}

    # a folder replaced in place (an RLlib checkpoint): its marker leaves the bucket first and
    # comes back last, so an upload cut off half-way is not taken for a whole checkpoint
    ckpt = other / "checkpoints" / "rllib"
    ckpt.mkdir(parents=True)
    for name in ("algorithm_state.pkl", "history.json", "zz_module.pt"):
        (ckpt / name).write_text("v1")
    storage.publish_folder(ckpt, "history.json")
    key = "unit/run/checkpoints/rllib/"
    assert set(_objects(s3, key)) == {"algorithm_state.pkl", "history.json", "zz_module.pt"}
    for name in ("algorithm_state.pkl", "history.json", "zz_module.pt"):
        (ckpt / name).write_text("v2, longer")
    pushed, push = [], storage.Mirror.push

    def cut_off(self, path):
        if len(pushed) == 1:
            raise storage.StorageError("connection lost")
        pushed.append(Path(path).name)
        push(self, path)

    monkeypatch.setattr(storage.Mirror, "push", cut_off)
    with pytest.raises(storage.StorageError):
        storage.publish_folder(ckpt, "history.json")
    assert pushed == ["algorithm_state.pkl"]  # the marker was not next, though it sorts so
    assert "history.json" not in _objects(s3, key)
    monkeypatch.setattr(storage.Mirror, "push", push)
    storage.publish_folder(ckpt, "history.json")
    assert s3.get_object(Bucket=BUCKET, Key=key + "history.json")["Body"].read() == b"v2, longer"


@pytest.mark.parametrize("uri, says", [("unknownfs://bucket/x", "unknownfs://"),
                                       ("az://container/x", "adlfs")])
def test_an_unreachable_scheme_is_refused_in_one_line_and_nothing_is_written(
        uri, says, tmp_path, monkeypatch, capsys):
    from rayworld.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAYWORLD_MIRROR", str(tmp_path / "mirror"))
    assert main(["pipeline", "--out", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and uri in err and says in err and "pip install" in err
    assert not list(tmp_path.iterdir())  # no folder named "unknownfs:", no mirror


def test_collect_into_a_bucket_commits_each_shard_before_the_manifest(s3, tmp_path):
    uri = f"s3://{BUCKET}/collect/run"
    done = _cli(["collect", "--out", uri, *_sets(["collect.episodes=3", "collect.max_steps=40",
                                                  "ray.num_cpus=2", "ray.object_store_mb=150"])],
                tmp_path / "m", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    got = _objects(s3, "collect/run/")
    import json

    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key="collect/run/data/manifest.json")
                          ["Body"].read())
    assert sorted(manifest["shards"]) == ["0", "1", "2"]
    for entry in manifest["shards"].values():
        assert got[f"data/{entry['file']}"]["Size"] == entry["bytes"]
    assert "config.yaml" in got and "logs/ray.log" in got
    assert not any(".tmp" in k for k in got)
    assert not Path(ROOT / "s3:").exists()


@pytest.mark.slow
def test_pipeline_in_a_bucket_resumes_on_another_machine_and_names_a_corrupt_object(
        s3, tmp_path):
    import json

    uri, prefix = f"s3://{BUCKET}/pipe/run", "pipe/run/"
    args = ["pipeline", "--config", "tune_configs/quickstart.yaml", "--out", uri, *_sets(SMALL)]
    proc = _cli(args, tmp_path / "first", popen=True)
    seen = []
    for line in proc.stdout:  # killed without warning once the VAE has a checkpoint
        seen.append(line)
        if line.startswith("vae epoch 1/2"):
            break
    deadline = time.time() + 120
    while time.time() < deadline and "checkpoints/vae/checkpoint_manager_snapshot.json" \
            not in _objects(s3, prefix):  # Ray Train's upload of epoch 1, in the bucket
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert any(s.startswith("vae epoch 1/2") for s in seen), "".join(seen)
    got = _objects(s3, prefix)
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=prefix + "data/manifest.json")
                          ["Body"].read())
    assert len(manifest["shards"]) == 4
    shards = {k: v["LastModified"] for k, v in got.items() if k.startswith("data/episodes/")}
    assert len(shards) == 4 and "checkpoints/vae.pt" not in got

    # a second machine (an empty mirror) completes what is missing, from the bucket alone
    done = _cli(args, tmp_path / "second", timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "vae: resuming after epoch 1" in done.stdout, done.stdout  # Ray Train's, from S3
    got = _objects(s3, prefix)
    assert {k: v["LastModified"] for k, v in got.items()
            if k.startswith("data/episodes/")} == shards  # not collected again
    report = json.loads(s3.get_object(Bucket=BUCKET, Key=prefix + "report.json")["Body"].read())
    assert report["evaluated_generation"] == 2 and report["episodes"] == 2
    assert {"checkpoints/vae.pt", "checkpoints/mdn.pt", "checkpoints/controller.pt",
            "summary.md", "images/predict.png", "images/evolve_curves.png"} <= set(got)
    assert any(k.startswith("tensorboard/vae/events.out.tfevents") for k in got)
    assert any(k.startswith("checkpoints/vae/checkpoint_") for k in got)  # Ray Train's own

    # a damaged object: one line that names it in the bucket and the stage to re-run
    s3.put_object(Bucket=BUCKET, Key=prefix + "checkpoints/mdn.pt", Body=b"not a checkpoint")
    bad = _cli(["evaluate", "--run", uri], tmp_path / "third", timeout=300)
    assert bad.returncode == 1
    err = [ln for ln in bad.stderr.splitlines() if "Ray's log" not in ln]
    assert len(err) == 1 and f"{uri}/checkpoints/mdn.pt" in err[0] and "train-mdn" in err[0]


@pytest.mark.slow
def test_pbt_and_asha_sweeps_in_a_bucket_over_data_in_a_bucket(s3, tmp_path):
    import json

    data, out = f"s3://{BUCKET}/sweep/data", f"s3://{BUCKET}/sweep/out"
    done = _cli(["pipeline", "--config", "tune_configs/quickstart.yaml", "--out", data,
                 *_sets(SMALL)], tmp_path / "m", timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    pbt = ["sweep.num_samples=2", "sweep.max_concurrent=2", "sweep.resources={cpu: 0.5}",
           "sweep.scheduler.perturbation_interval=2", "evolve.generations=4",
           "evolve.max_steps=30", "sweep.real_episodes=2", "evaluate.max_steps=40",
           "ray.num_cpus=2", "ray.object_store_mb=150"]
    done = _cli(["tune", "--config", "tune_configs/controller_pbt.yaml", "--out", out,
                 "--data", data, *_sets(pbt)], tmp_path / "other", timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    got = _objects(s3, "sweep/out/")
    report = json.loads(s3.get_object(Bucket=BUCKET, Key="sweep/out/sweep_report.json")
                        ["Body"].read())
    assert len(report["trials"]) == 2 and "real_return_mean" in report
    assert {"best/controller.pt", "best/config.yaml", "sweep.yaml"} <= set(got)
    assert any(k.startswith("tune/sweep/") and "checkpoint_" in k for k in got)  # Tune's own
    assert not (tmp_path / "other" / "s3" / BUCKET / "sweep" / "out" / "tune").exists()

    # an ASHA sweep of train trials, from a third empty mirror: each trial's run (its Ray
    # Train checkpoints, weights and event files) lives in the bucket, the data once
    asha = ["sweep.num_samples=2", "sweep.max_concurrent=1", "sweep.scheduler.max_t=2",
            "sweep.scheduler.grace_period=2", "mdn.epochs=2", "mdn.seq_len=16",
            "mdn.batch_size=8", "ray.num_cpus=2", "ray.cpus_per_worker=0.9",
            "ray.object_store_mb=150", "sweep.space.mdn.hidden={choice: [16, 32]}"]
    out = f"s3://{BUCKET}/sweep/mdn"
    done = _cli(["tune", "--config", "tune_configs/mdn_asha.yaml", "--out", out, "--data", data,
                 *_sets(asha)], tmp_path / "third", timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    got = _objects(s3, "sweep/mdn/")
    report = json.loads(s3.get_object(Bucket=BUCKET, Key="sweep/mdn/sweep_report.json")
                        ["Body"].read())
    assert len(report["trials"]) == 2 and all(t["epoch"] == 2 for t in report["trials"])
    for t in report["trials"]:
        run = f"trials/{t['trial']}/"
        # ASHA stops a trial at max_t, before it exports mdn.pt: its weights are Ray Train's
        assert {run + "checkpoints/vae.pt", run + "config.yaml",
                run + "images/mdn_curves.png"} <= set(got), sorted(got)
        assert any(k.startswith(run + "checkpoints/mdn/checkpoint_") for k in got)
        assert any(k.startswith(run + "tensorboard/mdn/events") for k in got)
    assert not any("/data/" in k for k in got)  # the trials link to the data; not copied
    assert "best/checkpoint/state.pt" in got and "best/config.yaml" in got
    best = report["best_trial"]
    assert report["best_checkpoint"].endswith("best/checkpoint")
    import io

    import torch

    state = torch.load(io.BytesIO(s3.get_object(
        Bucket=BUCKET, Key="sweep/mdn/best/checkpoint/state.pt")["Body"].read()),
        weights_only=True)
    assert state["epoch"] == 2 and state["history"]["val_nll"][-1] == pytest.approx(
        report["best_value"])
    assert best in {t["trial"] for t in report["trials"]}


def _private_mounts_work(tmp: Path) -> str | None:
    """Why a node cannot get a disk of its own here, or None when it can."""
    import shutil

    if shutil.which("unshare") is None:
        return "no `unshare` (util-linux) on this machine"
    probe = tmp / "probe"
    probe.mkdir()
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          f"mount -t tmpfs rw-probe {probe} && touch {probe}/x"],
                         capture_output=True, text=True)
    if out.returncode != 0 or (probe / "x").exists():
        return f"a private mount namespace needs root or CAP_SYS_ADMIN ({out.stderr.strip()})"
    return None


@pytest.mark.slow  # about 2 min: a head, a worker node with a disk of its own, the pipeline
def test_pipeline_on_a_cluster_whose_nodes_share_no_disk(s3, tmp_path):
    """A `ray start` head with no CPUs runs the driver; every task and actor runs on a worker
    node in a mount namespace of its own, where the run's mirror folder and Ray's temp dir
    are empty tmpfs mounts. So whatever a stage on one node reads, another node wrote to the
    bucket, not to a disk they share."""
    import json
    import shutil

    import psutil
    from conftest import processes_naming, ray_start_cmd, stop_processes_naming

    why = _private_mounts_work(tmp_path)
    if why:
        pytest.skip(why)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "on-the-head-only").write_text("the driver's disk")
    head_tmp, node_tmp = f"/tmp/rw-h{os.getpid()}", f"/tmp/rw-n{os.getpid()}"
    os.makedirs(node_tmp)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    before = frozenset(p.pid for p in psutil.process_iter())

    try:
        cmd, ports = ray_start_cmd(head_tmp, 0, head=True, ip="127.0.0.1")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        address = f"127.0.0.1:{ports['gcs']}"
        cmd, _ = ray_start_cmd(node_tmp, 2, head=False, ip="127.0.0.2")
        private = (f"mount -t tmpfs rw-node-disk {mirror} && "
                   f"mount -t tmpfs rw-node-tmp {node_tmp} && exec "
                   + " ".join([*cmd, "--address", address]))
        out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                              private], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]

        uri, prefix = f"s3://{BUCKET}/private/run", "private/run/"
        small = [s for s in SMALL if not s.startswith(("ray.num_cpus", "ray.object_store"))]
        done = _cli(["pipeline", "--config", "tune_configs/quickstart.yaml", "--out", uri,
                     "--address", address, *_sets(small)], mirror, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(s3.get_object(Bucket=BUCKET, Key=prefix + "report.json")
                            ["Body"].read())
        assert report["evaluated_generation"] == 2 and report["episodes"] == 2
        got = _objects(s3, prefix)
        assert {"checkpoints/vae.pt", "checkpoints/mdn.pt", "checkpoints/controller.pt",
                "data/series/starts.npz", "summary.md"} <= set(got)

        # the worker node's view of the same paths, through its raylet's mount namespace
        raylet = next(p for p in processes_naming(node_tmp, before) if p.name() == "raylet")
        seen = Path(f"/proc/{raylet.pid}/root") / str(mirror).lstrip("/")
        assert not (seen / "on-the-head-only").exists()
        assert (mirror / "on-the-head-only").exists()
        shards = list(seen.rglob("data/episodes/ep-*.parquet"))  # collected on the worker
        assert len(shards) == 4, sorted(seen.rglob("*"))
    finally:
        left = stop_processes_naming(node_tmp, before) + stop_processes_naming(head_tmp, before)
        for temp in (head_tmp, node_tmp):
            shutil.rmtree(temp, ignore_errors=True)
    assert not left, f"the test cluster left processes running: {left}"
