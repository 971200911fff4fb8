"""Dataset sources with real Ray tasks and real files: nuScenes through the real devkit, and
offline NPZ / HDF5 / torch sequence datasets."""

import json
import re
import shutil
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from nuscenes_tiny import BACK_COLOR, DARK, FRAMES, KEYFRAMES, SCENES, expected_actions, front_color

from rayworld.cli import main
from rayworld.config import load_config
from rayworld.data import Manifest, list_array, obs_array
from rayworld.pipeline import collect_stage as collect
from rayworld.sources import SourceError, gather, import_complete
from rayworld.sources.nuscenes import load_nuscenes, pose_actions

ROOT = Path(__file__).resolve().parents[1]
NAMES = sorted(s[0] for s in SCENES)
try:
    import nuscenes.nuscenes  # noqa: F401
    HAVE_DEVKIT = True
except ImportError:
    HAVE_DEVKIT = False
# nuscenes-devkit pins numpy<2, so these run in their own environment (scripts/test.sh)
devkit = pytest.mark.skipif(not HAVE_DEVKIT, reason="nuscenes-devkit is not installed here; "
                            "scripts/test.sh runs these in an environment with numpy<2")


@pytest.fixture(scope="module")
def tiny_nuscenes(tmp_path_factory):
    from nuscenes_tiny import make_tiny_nuscenes

    return make_tiny_nuscenes(tmp_path_factory.mktemp("nuscenes"))


def _ns_cfg(path, *sets):
    return load_config(None, ["source.kind=nuscenes", f"source.path={path}", "env.id=", *sets])


def _episode(run: Path, e: int) -> dict:
    m = Manifest.load(run / "data")
    t = pq.read_table(m.file(e))
    return {"obs": obs_array(t.column("obs"), m.info["obs_shape"]),
            "action": list_array(t.column("action")), "reward": t.column("reward").to_numpy(),
            "terminated": t.column("terminated").to_numpy(zero_copy_only=False),
            "truncated": t.column("truncated").to_numpy(zero_copy_only=False),
            "step": t.column("step").to_numpy(), "episode": t.column("episode").to_numpy()}


# ---------------------------------------------------------------- nuScenes

@pytest.mark.nuscenes
@devkit
def test_nuscenes_converts_every_camera_frame(ray_session, tiny_nuscenes, tmp_path):
    stats = collect(_ns_cfg(tiny_nuscenes), tmp_path)
    assert stats["episodes"] == stats["episodes_new"] == 3
    assert stats["frames_collected"] == stats["env_steps_new"] == 3 * FRAMES
    assert stats["return_mean"] == 0.0 and stats["wall_s"] > 0
    m = Manifest.load(tmp_path / "data")
    assert m.info["complete"] is True
    assert m.info["env_id"] == "nuscenes:v1.0-mini"
    assert (m.info["obs_shape"], m.info["action_dim"], m.info["discrete"]) == ([64, 64, 3], 2, False)
    assert m.info["source"] == {"kind": "nuscenes", "path": str(tiny_nuscenes.resolve()),
                                "version": "v1.0-mini", "camera": "CAM_FRONT", "keyframes_only": False,
                                "episodes": NAMES}
    for e, name in enumerate(NAMES):  # episodes in scene-name order
        ep = _episode(tmp_path, e)
        assert len(ep["obs"]) == FRAMES and list(ep["step"]) == list(range(FRAMES))
        assert (ep["episode"] == e).all()
        for t in (0, 6, FRAMES - 1):  # the walk starts at the first keyframe, ends with the sweeps
            np.testing.assert_allclose(ep["obs"][t, :, :28].reshape(-1, 3).mean(0), front_color(e, t), atol=3)
            np.testing.assert_allclose(ep["obs"][t, :, 36:].reshape(-1, 3).mean(0), DARK, atol=3)
        speed, rate = expected_actions(name)
        np.testing.assert_allclose(ep["action"][:, 0], speed, rtol=1e-4)
        np.testing.assert_allclose(ep["action"][:, 1], rate, atol=1e-4)
        assert (ep["reward"] == 0).all() and not ep["terminated"].any()
        assert ep["truncated"][-1] and not ep["truncated"][:-1].any()
    ds = ray_session.data.read_parquet(str(tmp_path / "data" / "episodes"))
    assert ds.count() == 3 * FRAMES


@pytest.mark.nuscenes
@devkit
def test_nuscenes_keyframes_of_another_camera(ray_session, tiny_nuscenes, tmp_path):
    collect(_ns_cfg(tiny_nuscenes, "source.keyframes_only=true", "source.camera=CAM_BACK"), tmp_path)
    for e, name in enumerate(NAMES):
        ep = _episode(tmp_path, e)
        assert len(ep["obs"]) == KEYFRAMES
        np.testing.assert_allclose(ep["obs"].reshape(-1, 3).mean(0), BACK_COLOR, atol=4)
        speed, rate = expected_actions(name)  # 0.5 s apart: the chord is a hair shorter than the arc
        np.testing.assert_allclose(ep["action"][:, 0], speed, rtol=1e-3)
        np.testing.assert_allclose(ep["action"][:, 1], rate, atol=1e-4)


@pytest.mark.nuscenes
@devkit
def test_nuscenes_rerun_skips_repairs_and_refuses_another_source(ray_session, tiny_nuscenes, tmp_path, capsys):
    collect(_ns_cfg(tiny_nuscenes), tmp_path)
    m = Manifest.load(tmp_path / "data")
    stamps = {e: m.file(e).stat().st_mtime_ns for e in m.shards}
    stats = collect(_ns_cfg(tiny_nuscenes), tmp_path)
    assert stats["episodes_new"] == 0 and stats["episodes"] == 3
    assert {e: m.file(e).stat().st_mtime_ns for e in m.shards} == stamps
    data = m.file(1).read_bytes()
    m.file(1).write_bytes(data[: len(data) // 2])  # a truncated shard is converted again
    logs = []
    stats = collect(_ns_cfg(tiny_nuscenes), tmp_path, log=logs.append)
    assert stats["episodes_new"] == 1 and stats["frames_collected"] == 3 * FRAMES
    assert any("replacing shard" in line for line in logs)
    assert m.file(0).stat().st_mtime_ns == stamps[0]
    assert len(_episode(tmp_path, 1)["obs"]) == FRAMES
    with pytest.raises(ValueError, match="source.keyframes_only False, config asks for True; use another --out"):
        collect(_ns_cfg(tiny_nuscenes, "source.keyframes_only=true"), tmp_path)
    other = tmp_path / "copy"
    shutil.copytree(tiny_nuscenes, other)
    with pytest.raises(ValueError, match=re.escape(f"with source.path '{tiny_nuscenes.resolve()}', config asks for '{other}'")):
        collect(_ns_cfg(other), tmp_path)
    npz = tmp_path / "ep.npz"
    np.savez(npz, obs=np.zeros((2, 64, 64, 3), np.uint8), actions=np.zeros((2, 2)), rewards=np.zeros(2))
    capsys.readouterr()
    assert main(["collect", "--out", str(tmp_path), "--set", "source.kind=offline",
                 "--set", f"source.path={npz}", "--set", "env.id="]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"rayworld collect: {tmp_path / 'data' / 'manifest.json'}: holds an import of " \
        f"{tiny_nuscenes.resolve()} (source.kind 'nuscenes'), config asks for source.kind 'offline'; " \
        "use another --out"
    assert Manifest.load(tmp_path / "data").info["source"]["kind"] == "nuscenes"
    assert sorted(p.name for p in (tmp_path / "data" / "episodes").iterdir()) == \
        [f"ep-00000{e}.parquet" for e in range(3)]


@pytest.mark.nuscenes
@devkit
def test_nuscenes_refuses_a_run_of_env_rollouts(ray_session, tiny_nuscenes, tmp_path):
    collect(load_config(None, ["collect.episodes=1", "collect.max_steps=5"]), tmp_path)
    with pytest.raises(ValueError, match="holds rollouts of env rayworld/SimpleDriving-v0"):
        collect(_ns_cfg(tiny_nuscenes), tmp_path)


@pytest.mark.nuscenes
@devkit
def test_nuscenes_errors_are_one_line(ray_session, tiny_nuscenes, tmp_path, monkeypatch, capsys):
    with pytest.raises(FileNotFoundError, match="v1.0-trainval not found"):
        load_nuscenes(tiny_nuscenes, "v1.0-trainval")
    with pytest.raises(ValueError, match="source.camera 'CAM_LEFT'.*expected one of CAM_BACK, CAM_FRONT"):
        collect(_ns_cfg(tiny_nuscenes, "source.camera=CAM_LEFT"), tmp_path / "a")
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "nuscenes.nuscenes", None)
        with pytest.raises(ImportError, match=r"pip install 'rayworld\[nuscenes\]'"):
            load_nuscenes(tiny_nuscenes, "v1.0-mini")
    # a missing JPEG, raised inside a Ray task, reaches the CLI as one line naming the file
    broken = tmp_path / "broken"
    from nuscenes_tiny import make_tiny_nuscenes

    make_tiny_nuscenes(broken)
    victim = sorted((broken / "sweeps" / "CAM_FRONT").glob("scene-0003*.jpg"))[-1]
    victim.unlink()
    capsys.readouterr()
    rc = main(["collect", "--out", str(tmp_path / "b"), "--set", "source.kind=nuscenes",
               "--set", f"source.path={broken}", "--set", "env.id="])
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert rc == 1 and line == f"rayworld collect: {victim}: cannot read this camera frame (no such file); " \
        "expected a JPEG"
    m = Manifest.load(tmp_path / "b" / "data")
    assert m.info["complete"] is False and 2 not in m.shards


@pytest.mark.nuscenes
@devkit
def test_import_complete_only_for_the_same_source_and_env_id(ray_session, tiny_nuscenes, tmp_path):
    collect(_ns_cfg(tiny_nuscenes), tmp_path / "ns")
    m = Manifest.load(tmp_path / "ns" / "data")
    assert import_complete(_ns_cfg(tiny_nuscenes), m)
    assert import_complete(_ns_cfg(f"{tiny_nuscenes}/../{tiny_nuscenes.name}"), m)  # the path, resolved
    assert not import_complete(_ns_cfg(tmp_path), m)  # another path
    assert not import_complete(_ns_cfg(tiny_nuscenes, "source.version=v1.0-trainval"), m)
    assert not import_complete(_ns_cfg(tiny_nuscenes, "source.camera=CAM_BACK"), m)
    assert not import_complete(_off_cfg(tiny_nuscenes), m)  # another kind
    m.info["complete"] = False
    assert not import_complete(_ns_cfg(tiny_nuscenes), m)
    # offline data imported with no env, then asked for with an env that takes its actions
    src = tmp_path / "src"
    src.mkdir()
    np.savez(src / "ep.npz", obs=np.zeros((3, 64, 64, 3), np.uint8), actions=np.zeros((3, 3), np.float32),
             rewards=np.zeros(3, np.float32))
    collect(_off_cfg(src), tmp_path / "off")
    m = Manifest.load(tmp_path / "off" / "data")
    assert m.info["env_id"] == "offline:src" and import_complete(_off_cfg(src), m)
    with_env = load_config(None, ["source.kind=offline", f"source.path={src}",
                                  "env.id=rayworld/SimpleDriving-v0"])
    assert not import_complete(with_env, m)
    with pytest.raises(SourceError, match="recorded as env_id 'offline:src', config asks for "
                                          "'rayworld/SimpleDriving-v0'.*use another --out"):
        collect(with_env, tmp_path / "off")
    assert Manifest.load(tmp_path / "off" / "data").info["env_id"] == "offline:src"


def _gather_fails(ray, failing, tmp_path, expect):
    """gather over a slow task and `failing` (tasks are nested functions: workers cannot import tests)."""
    def slow(out: str):
        (Path(out) / "started").touch()
        for _ in range(600):  # short sleeps: a cancel interrupts Python between them
            time.sleep(0.1)
        (Path(out) / "slow_finished").touch()  # never reached: gather cancels this task
        return []

    slow = ray.remote(num_cpus=1)(slow).remote(str(tmp_path))
    deadline = time.perf_counter() + 60
    while not (tmp_path / "started").exists() and time.perf_counter() < deadline:
        time.sleep(0.05)  # the slow task is running, as a conversion task would be
    bad = ray.remote(num_cpus=1, max_retries=0)(failing).remote()
    start = time.perf_counter()
    with pytest.raises(expect) as err:
        gather([slow, bad], 2, "test")
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(slow, timeout=30)
    assert time.perf_counter() - start < 30 and not (tmp_path / "slow_finished").exists()
    return err.value


def test_gather_source_error_is_one_line_and_cancels_the_rest(ray_session, tmp_path):
    def bad_data():
        raise SourceError("ep.npz: 'rewards' has shape [4]; expected [5]")

    e = _gather_fails(ray_session, bad_data, tmp_path, SourceError)
    assert type(e) is SourceError and str(e) == "ep.npz: 'rewards' has shape [4]; expected [5]"
    assert e.__cause__ is None and e.__suppress_context__


def test_gather_bug_keeps_its_type_and_traceback_and_cancels_the_rest(ray_session, tmp_path):
    def buggy_convert():
        return {}["cols"]

    e = _gather_fails(ray_session, buggy_convert, tmp_path, KeyError)
    assert isinstance(e, ray_session.exceptions.RayTaskError)  # Ray's error, as a KeyError too
    assert 'test_sources.py", line' in str(e) and "in buggy_convert" in str(e)  # the task's traceback
    assert str(e).rstrip().endswith("KeyError: 'cols'")


def test_gather_worker_crash_propagates_and_cancels_the_rest(ray_session, tmp_path):
    def crash():
        import os

        os._exit(1)

    _gather_fails(ray_session, crash, tmp_path, ray_session.exceptions.WorkerCrashedError)


def test_pose_actions_wrap_yaw_and_repeat_the_last():
    yaws = [3.0, -3.0, -2.9]  # +0.283 rad across the +-pi seam, then +0.1
    quats = [[np.cos(y / 2), 0, 0, np.sin(y / 2)] for y in yaws]
    a = pose_actions([0, 500_000, 1_500_000], [[0, 0, 5], [3, 4, 9], [3, 4, 9]], quats)
    np.testing.assert_allclose(a, [[10.0, (2 * np.pi - 6.0) / 0.5], [0.0, 0.1], [0.0, 0.1]], rtol=1e-5)
    with pytest.raises(ValueError, match="scene-x: ego pose timestamps 7 then 7 at frames 1, 2"):
        pose_actions([0, 7, 7], [[0, 0, 0]] * 3, quats, where="scene-x")


@pytest.mark.nuscenes
@devkit
def test_pipeline_on_nuscenes_trains_vae_and_mdn_and_skips_evolve(ray_session, tiny_nuscenes, tmp_path, capsys):
    out = tmp_path / "ns"
    args = ["pipeline", "--config", str(ROOT / "tune_configs/nuscenes.yaml"), "--out", str(out)]
    for item in (f"source.path={tiny_nuscenes}", "vae.epochs=1", "vae.batch_size=16", "vae.latent=8",
                 "mdn.epochs=1", "mdn.seq_len=8", "mdn.batch_size=4", "mdn.hidden=32",
                 "ray.cpus_per_worker=1"):
        args += ["--set", item]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "skipping evolve" in printed and "skipping evaluate" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["frames_collected"] == 3 * FRAMES
    assert 5 < report["vae_psnr_db"] < 60 and 0 < report["vae_ssim"] <= 1
    assert report["mdn_nll"] == report["mdn_nll"]
    assert set(report["wall_s"]) == {"collect", "train-vae", "encode", "train-mdn"}
    assert torch.load(out / "checkpoints" / "mdn.pt", weights_only=True)["action_dim"] == 2
    assert main(["pipeline", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for stage in ("collect", "train-vae", "encode", "train-mdn"):
        assert f"{stage} is up to date, skipping it" in printed
    # another dataset in the same --out is not skipped as "complete": collect refuses it
    other = tmp_path / "other_root"
    shutil.copytree(tiny_nuscenes, other)
    assert main(["pipeline", "--out", str(out), "--set", f"source.path={other}"]) == 1
    assert "use another --out" in capsys.readouterr().err


def test_nuscenes_has_no_env_to_play_in(tmp_path):
    from rayworld.config import ConfigError

    with pytest.raises(ConfigError, match="'env.id'.*expected '' with source.kind 'nuscenes'"):
        load_config(None, ["source.kind=nuscenes", f"source.path={tmp_path}"])


# ---------------------------------------------------------------- offline

def _off_cfg(path, *sets):
    return load_config(None, ["source.kind=offline", f"source.path={path}", "env.id=", *sets])


def _frames(values, shape):
    """Frames of one flat colour each: values [T, C] in the dtype of the array wanted."""
    values = np.asarray(values)
    return np.broadcast_to(values[:, None, None, :], (len(values), *shape, values.shape[1])).copy()


def test_offline_npz_directory_chw_floats(ray_session, tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    want = {}
    for i, steps in enumerate([7, 5, 9]):
        colour = rng.integers(0, 256, (steps, 3)) / 255.0  # exact after *255 and rounding
        obs = _frames(colour.astype(np.float32), (80, 80)).transpose(0, 3, 1, 2)  # [T,3,80,80]
        if i == 1:  # one final observation more than actions: dropped
            obs = np.concatenate([obs, obs[-1:]])
        act = rng.uniform(-1, 1, (steps, 2)).astype(np.float32)
        rew = rng.normal(size=(steps, 1)).astype(np.float32)
        arrays = {"observation": obs, "action": act, "reward": rew}
        if i == 2:
            arrays["is_terminal"] = np.arange(steps) == steps - 1
        np.savez_compressed(src / f"ep_{i * 5}.npz", **arrays)  # ep_0, ep_5, ep_10: natural order
        want[i] = (np.round(colour * 255), act, rew[:, 0], i == 2)
    stats = collect(_off_cfg(src), tmp_path / "run")
    run = tmp_path / "run"
    m = Manifest.load(run / "data")
    assert stats["episodes"] == 3 and stats["frames_collected"] == 21
    assert m.info["source"]["episodes"] == ["ep_0.npz", "ep_5.npz", "ep_10.npz"]
    assert (m.info["env_id"], m.info["action_dim"], m.info["discrete"]) == ("offline:src", 2, False)
    for e, (colour, act, rew, terminal) in want.items():
        ep = _episode(run, e)
        np.testing.assert_array_equal(ep["obs"], _frames(colour.astype(np.uint8), (64, 64)))
        np.testing.assert_array_equal(ep["action"], act)
        np.testing.assert_allclose(ep["reward"], rew)
        assert ep["terminated"][-1] == terminal and ep["truncated"][-1] != terminal
        assert not (ep["terminated"][:-1].any() or ep["truncated"][:-1].any())
    assert stats["return_mean"] == pytest.approx(np.mean([w[2].sum() for w in want.values()]), rel=1e-5)
    assert collect(_off_cfg(src), run)["episodes_new"] == 0
    np.savez(src / "ep_1.npz", obs=np.zeros((2, 64, 64, 3), np.uint8), actions=np.zeros((2, 2)),
             rewards=np.zeros(2))  # sorts between ep_0 and ep_5: episode numbers would shift
    with pytest.raises(ValueError, match=r"changed since it was imported \(3 episodes then, 4 now\)"):
        collect(_off_cfg(src), run)


def test_offline_hdf5_flat_buffer_split_at_terminals_and_timeouts(ray_session, tmp_path):
    n = 20
    term, tout = np.zeros(n, bool), np.zeros(n, bool)
    term[5], tout[11] = True, True  # episodes 0..5, 6..11, 12..19 (the tail has no flag)
    obs = _frames(np.arange(n)[:, None].repeat(3, 1).astype(np.uint8) * 10, (64, 64))
    with h5py.File(tmp_path / "d4rl.hdf5", "w") as f:
        f["observations"] = obs
        f["actions"] = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
        f["rewards"] = np.arange(n, dtype=np.float32)
        f["terminals"], f["timeouts"] = term, tout
        f["infos/qpos"] = np.zeros((n, 2))  # other arrays are ignored
    stats = collect(_off_cfg(tmp_path / "d4rl.hdf5"), tmp_path / "run")
    assert stats["episodes"] == 3
    m = Manifest.load(tmp_path / "run" / "data")
    assert m.info["source"]["episodes"] == ["d4rl.hdf5#0", "d4rl.hdf5#1", "d4rl.hdf5#2"]
    for e, (lo, hi) in enumerate([(0, 6), (6, 12), (12, 20)]):
        ep = _episode(tmp_path / "run", e)
        np.testing.assert_array_equal(ep["obs"], obs[lo:hi])
        np.testing.assert_array_equal(ep["reward"], np.arange(lo, hi))
        np.testing.assert_array_equal(ep["action"][:, 0], np.arange(lo, hi) * 3)
        assert list(ep["terminated"]) == [False] * (hi - lo - 1) + [e == 0]
        assert list(ep["truncated"]) == [False] * (hi - lo - 1) + [e != 0]


def test_offline_hdf5_groups_grayscale_discrete(ray_session, tmp_path):
    with h5py.File(tmp_path / "atari.h5", "w") as f:
        f.attrs["action_n"] = 6
        for i, steps in enumerate([4, 6]):
            g = f.create_group(f"episode_{i}")
            g["pixels"] = np.full((steps, 32, 32), 100 + i, np.uint8)  # grayscale, upscaled
            g["action"] = np.arange(steps) % 3
            g["reward"] = np.ones(steps)
    stats = collect(_off_cfg(tmp_path / "atari.h5"), tmp_path / "run")
    m = Manifest.load(tmp_path / "run" / "data")
    assert stats["frames_collected"] == 10
    assert (m.info["discrete"], m.info["action_n"], m.info["action_dim"]) == (True, 6, 1)
    assert m.info["source"]["episodes"] == ["atari.h5:episode_0", "atari.h5:episode_1"]
    ep = _episode(tmp_path / "run", 1)
    assert (ep["obs"] == 101).all() and ep["obs"].shape == (6, 64, 64, 3)
    np.testing.assert_array_equal(ep["action"][:, 0], [0, 1, 2, 0, 1, 2])


def test_offline_torch_file_list_of_episodes(ray_session, tmp_path):
    eps = [{"obs": torch.full((n, 64, 64, 3), 7, dtype=torch.uint8), "actions": torch.zeros(n, 4),
            "rewards": torch.full((n,), 0.5)} for n in (3, 4)]
    torch.save(eps, tmp_path / "buffer.pt")
    stats = collect(_off_cfg(tmp_path / "buffer.pt"), tmp_path / "run")
    assert (stats["episodes"], stats["frames_collected"], stats["return_mean"]) == (2, 7, 1.75)


def test_offline_bad_input_one_line(ray_session, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    np.savez(src / "ep.npz", obs=np.zeros((5, 64, 64, 3), np.uint8), acts=np.zeros((5, 2), np.float32),
             rewards=np.zeros(5, np.float32))
    capsys.readouterr()
    rc = main(["collect", "--out", str(tmp_path / "run"), "--set", "source.kind=offline",
               "--set", f"source.path={src}", "--set", "env.id="])
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert rc == 1 and line.startswith(f"rayworld collect: {src / 'ep.npz'}: no action array under '/'")
    assert "expected one of actions, action (set source.keys.action to its name)" in line
    # the rename map fixes it
    assert collect(_off_cfg(src, "source.keys={action: acts}"), tmp_path / "ok")["frames_collected"] == 5

    def fails(arrays, match):
        np.savez(src / "ep.npz", **arrays)
        with pytest.raises(ValueError, match=match):
            collect(_off_cfg(src / "ep.npz"), tmp_path / "bad")

    good = {"obs": np.zeros((5, 64, 64, 3), np.uint8), "actions": np.zeros((5, 2), np.float32),
            "rewards": np.zeros(5, np.float32)}
    fails({**good, "rewards": np.zeros(4)}, r"ep.npz: 'rewards' has shape \[4\]; expected \[5\]")
    fails({**good, "actions": np.zeros((3, 2))}, "'actions' has 3 steps, 'obs' has 5")
    fails({**good, "obs": np.zeros((5, 8, 8, 8))}, r"'obs' has shape \[5, 8, 8, 8\]; expected")
    fails({**good, "obs": np.full((5, 64, 64, 3), 3.0)},  # checked in the task: raised as itself
          r"ep.npz 'obs' steps 0..4: float64 values in \[3, 3\]; expected uint8")
    with pytest.raises(ValueError, match="source.keys: unknown name 'observation'"):
        collect(_off_cfg(src, "source.keys={observation: obs}"), tmp_path / "bad2")
    (tmp_path / "x.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(ValueError, match="x.pkl: not a dataset file.*pickles can run code"):
        collect(_off_cfg(tmp_path / "x.pkl"), tmp_path / "bad3")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="junk.h5: cannot read it as hdf5"):
        collect(_off_cfg(tmp_path / "junk.h5"), tmp_path / "bad4")
    # evolve and evaluate would play env.id: it must take the data's actions
    np.savez(src / "ep.npz", **good)
    with pytest.raises(ValueError, match=r"'env.id': rayworld/SimpleDriving-v0 has action_dim 3, "
                                         r"the offline data at .* has 2"):
        collect(load_config(None, ["source.kind=offline", f"source.path={src}"]), tmp_path / "bad5")


def test_offline_damaged_npz_is_one_line(ray_session, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    np.savez_compressed(src / "ep.npz", obs=rng.integers(0, 255, (40, 64, 64, 3), np.uint8),
                        actions=np.zeros((40, 2), np.float32), rewards=np.zeros(40, np.float32))
    data = bytearray((src / "ep.npz").read_bytes())
    data[len(data) // 3:len(data) // 3 + 256] = bytes(256)  # inside obs' compressed bytes; the header is intact
    (src / "ep.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"ep.npz: array 'obs' cannot be read \(.*\); expected an undamaged .npz"):
        collect(_off_cfg(src), tmp_path / "run")
    assert not list((tmp_path / "run" / "data" / "episodes").glob("*.parquet"))
