"""Losing a node of a real multi-node Ray cluster (several raylets on this machine) mid-stage:
collection writes every episode exactly once, evolution completes every generation with the
fitness it has without the loss, and Ray Train goes on from its last checkpoint. The cluster runs in its own process
(tests/multinode_faults.py); the lost node is replaced, as an autoscaler would."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import own_ray_tmp, processes_naming
from test_collect import _assert_exactly_once

ROOT = Path(__file__).resolve().parents[1]


def _run(*args) -> dict:
    """Run one case in its own process, with Ray's files under a temp root of its own; fail if
    any of the cluster's processes outlives it."""
    with own_ray_tmp("rw-mn-") as (ray_tmp, env):
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_faults.py"),
                               *args], capture_output=True, text=True, timeout=600, cwd=ROOT,
                              env=env)
        left = processes_naming(str(ray_tmp))
        gone, alive = psutil.wait_procs(left, timeout=15)  # workers end after their raylet
        for p in alive:
            p.kill()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not alive, f"the cluster left processes running: {alive}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # about 2 min: a 3-node cluster
def test_collect_loses_a_node_and_writes_every_episode_once(tmp_path):
    result = _run("collect", str(tmp_path))
    assert result.get("node_removed_mid_stage"), f"the stage ended before the loss: {result}"
    assert result["episodes_new"] == 24
    assert sum(result["restarts"].values()) >= 1, result  # the lost node's collector came back
    _assert_exactly_once(tmp_path, 24)


@pytest.mark.slow  # about 2 min: a 3-node cluster, twice
def test_evolve_loses_a_node_and_keeps_every_generations_fitness(tiny_run, tmp_path):
    result = _run("evolve", str(tiny_run), str(tmp_path))
    assert result.get("node_removed_mid_stage"), f"the stage ended before the loss: {result}"
    assert any("died" in line for line in result["lines"]), result["lines"]
    hist = {}
    for name in ("reference", "faulted"):
        state = pickle.loads((tmp_path / name / "checkpoints" / "evolve_state.pkl").read_bytes())
        assert state["generation"] == 8
        hist[name] = state["history"]
    for key in ("dream_best", "dream_mean", "dream_worst"):
        np.testing.assert_allclose(hist["faulted"][key], hist["reference"][key], rtol=1e-5)


@pytest.mark.slow  # ~90 s: three VAE epochs, a lost node, and Ray Train's restart
def test_training_loses_its_workers_node_and_resumes_from_the_last_checkpoint(tiny_run,
                                                                               tmp_path):
    result = _run("train", str(tiny_run), str(tmp_path))
    assert result.get("node_removed_mid_stage"), f"the stage ended before the loss: {result}"
    assert result["vae_epochs"] == 3 and result["epoch"] == 3
    # it went on from the checkpoint committed before the loss, not from scratch
    assert len(result["resumed_from"]) == 1 and 1 <= result["resumed_from"][0] < 3, result
