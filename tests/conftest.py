import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


def start_ray(dashboard: bool = False):
    import ray

    kwargs = {"dashboard_port": free_ports()[0]} if dashboard else {}
    ray.init(address="local", num_cpus=2, include_dashboard=dashboard,
             object_store_memory=200 * 1024 * 1024,
             log_to_driver=False, **kwargs)
    return ray


def free_ports(n: int = 1) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all bound at once, so no two are the same)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def own_ray_tmp(prefix: str):
    """A Ray temp root of its own for a subprocess, and the environment that points Ray at it
    (its sessions and the address file `ray start` leaves go there), removed afterwards.
    Short, under /tmp: Unix socket paths are limited to 107 bytes."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": path}
    env.pop("RAY_ADDRESS", None)
    try:
        yield Path(path), env
    finally:
        shutil.rmtree(path, ignore_errors=True)


def processes_naming(path: str, before: frozenset = frozenset()) -> list:
    """Live processes (not in `before`) whose command line names `path`: a Ray started under
    its own temp dir, whose processes a test must not leave behind."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid not in before and path in " ".join(p.info["cmdline"] or []) and \
                    p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def ray_start_cmd(temp: str, cpus: int, head: bool, ip: str | None = None):
    """(`ray start` for one node of a test cluster, its ports by name): every port a free one
    of its own, its own temp dir, 300 MB of object store, no usage stats. A head also gets a
    GCS, dashboard (on 127.0.0.1) and client port."""
    names = ("node", "objects", "metrics", "agent", "agent_grpc", "runtime_env", "gcs",
             "dashboard", "client")
    ports = dict(zip(names, free_ports(len(names))))
    cmd = ["ray", "start", "--num-cpus", str(cpus), "--temp-dir", temp,
           "--object-store-memory", str(300 * 2**20), "--disable-usage-stats",
           "--node-manager-port", str(ports["node"]), "--object-manager-port",
           str(ports["objects"]), "--metrics-export-port", str(ports["metrics"]),
           "--dashboard-agent-listen-port", str(ports["agent"]), "--dashboard-agent-grpc-port",
           str(ports["agent_grpc"]), "--runtime-env-agent-port", str(ports["runtime_env"])]
    if ip:
        cmd += ["--node-ip-address", ip]
    if head:
        cmd += ["--head", "--port", str(ports["gcs"]), "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(ports["dashboard"]), "--ray-client-server-port",
                str(ports["client"])]
    return cmd, ports


def stop_processes_naming(path: str, before: frozenset = frozenset()) -> list:
    """What `ray stop --force` does, for the Ray started under `path` only (it would also stop
    the test session's Ray): SIGTERM, then SIGKILL for what ignores it (gcs_server does).
    Returns what is still alive."""
    import signal

    import psutil

    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = processes_naming(path, before)
        for p in left:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=15)
    return processes_naming(path, before)


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole test session."""
    ray = start_ray()
    yield ray
    ray.shutdown()


TINY = ["collect.episodes=12", "collect.max_steps=80", "vae.epochs=1", "vae.batch_size=32",
        "mdn.epochs=2", "mdn.seq_len=16", "mdn.batch_size=8", "mdn.hidden=64",
        "ray.cpus_per_worker=1", "evolve.generations=6", "evolve.population=8",
        "evolve.rollouts=4", "evolve.max_steps=60", "evolve.real_every=3",
        "evolve.real_episodes=2", "evaluate.episodes=4", "evaluate.max_steps=80",
        "mdn.dropout=0.0"]  # a plain dream: the tests below check CMA-ES progress in it


@pytest.fixture(scope="session")
def tiny_run(ray_session, tmp_path_factory):
    """One tiny quickstart pipeline, every stage, shared by the tests that read its outputs."""
    from pathlib import Path

    from rayworld.cli import main

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("pipe") / "quick"
    args = ["pipeline", "--config", str(root / "tune_configs/quickstart.yaml"), "--out", str(out)]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0
    return out
