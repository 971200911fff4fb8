"""Node loss on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster: one
raylet per node). Run by tests/test_multinode.py in its own process, since the cluster needs
a Ray of its own:

    python tests/multinode_faults.py collect OUT
    python tests/multinode_faults.py evolve RUN OUT
    python tests/multinode_faults.py train RUN OUT

A head with no CPUs (the driver's node) and two 1-CPU worker nodes. Mid-stage, one worker node
is removed without warning and a fresh one joins, as a cluster's autoscaler would replace it.
Prints one JSON line of what happened; the test checks the outputs.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from rayworld.config import load_config

CLUSTERS: list[Cluster] = []


def shutdown():
    """Every cluster this process started, also when a case fails."""
    ray.shutdown()
    while CLUSTERS:
        CLUSTERS.pop().shutdown()


def cluster() -> tuple[Cluster, list]:
    with socket.socket() as s:  # the state API needs the dashboard: on a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Ray's files (and the cluster's address file) go under $RAY_TMPDIR, which the test sets
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_port": port})
    CLUSTERS.append(c)
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address)
    return c, nodes


def restarts(prefix: str) -> dict:
    """How often each of the stage's actors was restarted (a lost node's actors were)."""
    from ray.util.state import list_actors

    return {a.name: int(a.num_restarts) for a in list_actors(limit=1000, detail=True)
            if (a.name or "").startswith(prefix)}


def with_node_loss(c: Cluster, nodes: list, stage, when, info: dict):
    """Run stage() in a thread; once when() is true, remove the first worker node at once (no
    graceful drain) and add a replacement. Ray adds and removes nodes from the main thread
    only, so the stage runs beside it."""
    errors = []

    def run():
        try:
            info["result"] = stage()
        except BaseException as e:  # reported by the caller
            errors.append(e)
    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 300
    while t.is_alive() and time.time() < deadline and not when():
        time.sleep(0.05)
    if t.is_alive():
        c.remove_node(nodes[0], allow_graceful=False)
        info["node_removed_mid_stage"] = True
        nodes[0] = c.add_node(num_cpus=1)
    t.join()
    if errors:
        raise errors[0]


def collect_case(out: Path) -> dict:
    from rayworld.collect import collect

    c, nodes = cluster()
    info, lines = {}, []
    cfg = load_config(None, ["collect.episodes=24", "collect.max_steps=1000",
                             "collect.num_actors=2"])
    ep_dir = out / "data" / "episodes"
    with_node_loss(c, nodes, lambda: collect(cfg, out, log=lines.append),
                   lambda: len(list(ep_dir.glob("ep-*.parquet"))) >= 2, info)
    info["episodes_new"] = info.pop("result")["episodes_new"]
    info["lines"] = lines
    info["restarts"] = restarts("collector-")
    return info


def evolve_case(run: Path, out: Path) -> dict:
    """The same evolve twice on copies of `run`: untouched, then losing a node after
    generation 1. Each copy's state file holds its per-generation fitness."""
    from rayworld.evolve import STATE, evolve

    sets = ["evolve.generations=8", "evolve.population=8", "evolve.rollouts=16",
            "evolve.max_steps=400", "evolve.real_episodes=0", "evolve.num_actors=2"]
    c, nodes = cluster()

    def fresh(name: str):
        target = out / name
        shutil.copytree(run, target)
        for f in (STATE, "controller.pt"):
            (target / "checkpoints" / f).unlink(missing_ok=True)
        return load_config(target / "config.yaml", sets), target

    cfg, target = fresh("reference")
    evolve(cfg, target, log=lambda line: None)
    cfg, target = fresh("faulted")
    lines: list[str] = []
    info = {"lines": lines}
    with_node_loss(c, nodes, lambda: evolve(cfg, target, log=lines.append),
                   lambda: any("gen 1/" in ln for ln in lines), info)
    info.pop("result", None)
    return info


def train_case(run: Path, out: Path) -> dict:
    """train-vae with its Ray Train worker on a worker node; once the first checkpoint is
    committed, that node is lost, and Ray Train must go on from the checkpoint elsewhere."""
    from ray.util.state import list_actors
    from test_train_scale import _committed_checkpoint, _last_state  # this script's folder

    from rayworld.train.vae import train_vae

    shutil.copytree(run / "data", out / "data")
    shutil.copy(run / "config.yaml", out / "config.yaml")
    cfg = load_config(out / "config.yaml", ["vae.epochs=3", "ray.max_failures=2",
                                            "ray.num_workers=1", "ray.cpus_per_worker=1"])
    c, nodes = cluster()

    def worker_node_first() -> bool:  # lose the node that runs the Train worker
        if not _committed_checkpoint(out / "checkpoints" / "vae"):
            return False
        hosts = {a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                 if "RayTrainWorker" in (a.class_name or "")}
        for i, n in enumerate(nodes):
            if n.node_id in hosts:
                nodes[0], nodes[i] = nodes[i], nodes[0]
                return True
        return False

    info: dict = {}
    t0 = time.time()
    with_node_loss(c, nodes, lambda: train_vae(cfg, out, log=lambda line: None),
                   worker_node_first, info)
    info["wall_s"] = round(time.time() - t0, 1)
    info["vae_epochs"] = info.pop("result")["vae_epochs"]
    state = _last_state(out, "vae")
    info["epoch"] = state["epoch"]
    info["resumed_from"] = list(state["resumed_from"])
    return info


if __name__ == "__main__":
    case = {"collect": collect_case, "evolve": evolve_case, "train": train_case}[sys.argv[1]]
    try:
        result = case(*map(Path, sys.argv[2:]))
    finally:
        shutdown()
    print(json.dumps(result))
