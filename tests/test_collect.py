"""Collection with real Ray actors, real SimpleDriving envs and real Parquet shards."""

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayworld.collect import collect
from rayworld.config import load_config
from rayworld.data import Manifest, shard_name
from rayworld.policies import make_policy, run_episode

ROOT = Path(__file__).resolve().parents[1]


def _cfg(*sets):
    return load_config(None, ["collect.max_steps=60", "collect.episodes=6", *sets])


def _rows(run):
    table = pq.read_table(run / "data" / "episodes", columns=["episode", "step", "reward"])
    return table.column("episode").to_numpy(), table.column("step").to_numpy()


def _assert_exactly_once(run, episodes):
    m = Manifest.load(run / "data")
    assert sorted(m.shards) == list(range(episodes))
    ep, step = _rows(run)
    pairs = set(zip(ep.tolist(), step.tolist()))
    assert len(pairs) == len(ep) == m.frames  # no duplicated or missing step
    for e, s in m.shards.items():
        assert (ep == e).sum() == s["steps"]
    return m


def _reference_rewards(cfg, episode):
    from rayworld.envs import make_env

    env = make_env(cfg.env.id, **cfg.env.kwargs)
    seed = cfg.collect.seed + episode
    policy = make_policy(cfg.collect.policy, env.action_space, seed, cfg.collect.brownian_sigma)
    return run_episode(env, policy, seed, cfg.collect.max_steps)[2]


def test_collect_writes_shards_that_ray_data_and_pyarrow_read(ray_session, tmp_path):
    cfg = _cfg()
    stats = collect(cfg, tmp_path)
    m = _assert_exactly_once(tmp_path, 6)
    assert stats["frames_collected"] == m.frames > 6
    assert stats["env_steps_per_s"] > 0
    ds = ray_session.data.read_parquet(str(tmp_path / "data" / "episodes"))
    assert ds.count() == m.frames
    row = ds.take(1)[0]
    assert len(row["obs"]) == 64 * 64 * 3 and len(row["action"]) == 3
    for e in (0, 5):  # episodes are reproducible from their seed
        got = pq.read_table(m.file(e)).column("reward").to_numpy()
        np.testing.assert_allclose(got, _reference_rewards(cfg, e))


def test_rerun_completes_missing_and_repairs(ray_session, tmp_path):
    cfg = _cfg("collect.episodes=4")
    collect(cfg, tmp_path)
    m = Manifest.load(tmp_path / "data")
    ep_dir = tmp_path / "data" / "episodes"
    before = {e: m.file(e).read_bytes() for e in m.shards}
    # A crash after a shard was renamed but before the manifest listed it:
    del m.shards[3]
    m.save()
    # A half-written temporary file, and a truncated shard:
    (ep_dir / ".ep-000009.parquet.abc.tmp").write_bytes(b"partial")
    data = m.file(1).read_bytes()
    m.file(1).write_bytes(data[: len(data) // 2])
    logs = []
    stats = collect(_cfg("collect.episodes=7"), tmp_path, log=logs.append)
    assert any("ep-000001.parquet" in line and "replacing" in line for line in logs)
    assert stats["episodes_new"] == 4  # 1 (replaced) + 4, 5, 6; episode 3 was adopted
    _assert_exactly_once(tmp_path, 7)
    assert not list(ep_dir.glob(".*"))
    for e, blob in before.items():  # the repaired shard holds the same episode again
        assert pq.read_table(ep_dir / shard_name(e)).equals(pq.read_table(pa.BufferReader(blob)))


def test_killed_actor_restarts_and_redoes_its_episode(ray_session, tmp_path):
    cfg = load_config(None, ["env.id=rayworld/CarRacing-v0", "collect.episodes=4",
                             "collect.max_steps=120", "collect.num_actors=2"])
    killed = {}

    def killer():
        import ray

        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                actor = ray.get_actor("collector-0")
            except ValueError:
                time.sleep(0.05)
                continue
            time.sleep(1.5)  # the actor is mid-episode
            killed["done_before"] = len(list((tmp_path / "data" / "episodes").glob("ep-*")))
            ray.kill(actor, no_restart=False)
            return

    t = threading.Thread(target=killer)
    t.start()
    collect(cfg, tmp_path)
    t.join()
    assert killed["done_before"] < 4
    m = _assert_exactly_once(tmp_path, 4)
    for e in m.shards:
        got = pq.read_table(m.file(e)).column("reward").to_numpy()
        np.testing.assert_allclose(got, _reference_rewards(cfg, e), rtol=1e-6)


def test_interrupted_cli_run_resumes(ray_session, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rayworld.cli", "collect", "--out", str(out),
           "--set", "collect.episodes=40", "--set", "collect.max_steps=200",
           "--set", "ray.num_cpus=1", "--set", "ray.object_store_mb=100"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    ep_dir = out / "data" / "episodes"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(ep_dir.glob("ep-*"))) < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    proc.wait(timeout=60)
    partial = len(list(ep_dir.glob("ep-*.parquet")))
    assert 3 <= partial < 40
    cfg = load_config(out / "config.yaml")
    stats = collect(cfg, out)
    assert stats["episodes_new"] <= 40 - partial + 1
    _assert_exactly_once(out, 40)


def test_unknown_env_lists_known_ids(ray_session, tmp_path):
    from rayworld.envs import UnknownEnvError

    with pytest.raises(UnknownEnvError, match="rayworld/SimpleDriving-v0"):
        collect(_cfg("env.id=rayworld/Nope-v0"), tmp_path)


def test_mix_gives_each_episode_its_policy_and_reproduces_it(ray_session, tmp_path):
    from rayworld.collect import episode_policy

    cfg = _cfg("collect.policy=track", "collect.mix={drive: 0.5}", "collect.episodes=6")
    kinds = [episode_policy(cfg.collect, e) for e in range(6)]
    assert set(kinds) == {"track", "drive"}  # seeds 0..5 draw both
    collect(cfg, tmp_path)
    m = _assert_exactly_once(tmp_path, 6)
    for e in range(6):
        meta = pq.read_schema(m.file(e)).metadata
        assert meta[b"rayworld.policy"].decode() == kinds[e]
        from rayworld.envs import make_env

        env = make_env(cfg.env.id)
        seed = cfg.collect.seed + e
        want = run_episode(env, make_policy(kinds[e], env.action_space, seed,
                                            cfg.collect.brownian_sigma, cfg.collect.gas),
                           seed, cfg.collect.max_steps)[1]
        got = np.stack(pq.read_table(m.file(e)).column("action").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(got, want)
