"""A laptop run stays on the laptop: the Ray a run starts in-process listens on loopback only."""
import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import own_ray_tmp

ROOT = Path(__file__).resolve().parents[1]


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or addr).is_loopback


def _listening(root: psutil.Process) -> set[tuple[str, str, int]]:
    seen = set()
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return seen
    for p in procs:
        try:
            name = p.name()
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    seen.add((name, c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return seen


def _watch(cmd, env) -> tuple[set, str, int]:
    """Run a command to its end; every listening socket its process tree opened, its output
    and its exit code."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=env)
    try:
        root = psutil.Process(proc.pid)
        seen: set = set()
        deadline = time.time() + 400
        while proc.poll() is None and time.time() < deadline:
            seen |= _listening(root)
            time.sleep(0.1)
        output = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    return seen, output, proc.returncode


def test_an_in_process_run_listens_on_loopback_only(tmp_path):
    """Without --address a run starts its own Ray (never a cluster that a stale address file
    names), and every port that Ray opens listens on loopback."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rayworld.cli", "collect", "--out", str(out),
           "--set", "collect.episodes=12", "--set", "collect.max_steps=300",
           "--set", "ray.num_cpus=1", "--set", "ray.object_store_mb=100",
           "--set", "ray.dashboard=true"]
    with own_ray_tmp("rw-net-") as (ray_tmp, env):
        # the address file `ray start` leaves behind, naming a cluster that is gone
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
        seen, output, rc = _watch(cmd, env)
    assert rc == 0, output
    names = {name for name, _, _ in seen}
    # the sockets were seen while Ray ran: its GCS and raylet, and the dashboard on
    assert {"gcs_server", "raylet"} <= names, seen
    exposed = sorted(s for s in seen if not _loopback(s[1]))
    assert not exposed, f"listening beyond loopback: {exposed}"


@pytest.mark.slow  # about 2 to 3 minutes here: Ray Train's start-up and one VAE epoch
def test_ddp_training_in_process_listens_on_loopback_only(tmp_path):
    """Ray Train's workers meet without torch's TCPStore, which binds every interface: two DDP
    workers train, and nothing listens beyond loopback."""
    out = tmp_path / "run"
    small = ["--set", "ray.num_cpus=2", "--set", "ray.object_store_mb=100"]
    before = set(Path("/tmp").glob("rw-pg-*"))
    with own_ray_tmp("rw-net-") as (_, env):
        _, output, rc = _watch([sys.executable, "-m", "rayworld.cli", "collect", "--out",
                                str(out), "--set", "collect.episodes=3", "--set",
                                "collect.max_steps=50", *small], env)
        assert rc == 0, output
        seen, output, rc = _watch([sys.executable, "-m", "rayworld.cli", "train-vae", "--out",
                                   str(out), "--set", "vae.epochs=1", "--set",
                                   "vae.batch_size=32", "--set", "ray.num_workers=2", "--set",
                                   "ray.cpus_per_worker=0.5", *small], env)
    assert rc == 0, output
    assert "vae epoch 1/1" in output
    assert any(name.startswith("ray::RayTrainWorker") for name, _, _ in seen), seen
    exposed = sorted(s for s in seen if not _loopback(s[1]))
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert set(Path("/tmp").glob("rw-pg-*")) <= before, "the rendezvous file was left"


def test_stale_rendezvous_files_of_dead_starters_are_cleared(tmp_path):
    """A trial that Tune stops never runs on_shutdown; the next start removes its file, and
    only files whose starter has died."""
    from rayworld.train.rendezvous import clear_stale

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid is now free: the starter of a stopped trial
    dead = tmp_path / f"rw-pg-{child.pid}-{'a' * 32}"
    live = tmp_path / f"rw-pg-{os.getpid()}-{'b' * 32}"
    legacy = tmp_path / f"rw-pg-{'c' * 32}"
    for p in (dead, live, legacy):
        p.write_bytes(b"")
    assert clear_stale(str(tmp_path)) == [str(dead)]
    assert not dead.exists() and live.exists() and legacy.exists()
