"""Dataset sources with real Ray tasks and real files: nuScenes through the real devkit."""

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from nuscenes_tiny import BACK_COLOR, DARK, FRAMES, KEYFRAMES, SCENES, expected_actions, front_color

from rayworld.cli import main
from rayworld.collect import collect
from rayworld.config import load_config
from rayworld.data import Manifest, list_array, obs_array
from rayworld.sources.nuscenes import load_nuscenes, pose_actions

ROOT = Path(__file__).resolve().parents[1]
NAMES = sorted(s[0] for s in SCENES)


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


def test_nuscenes_keyframes_of_another_camera(ray_session, tiny_nuscenes, tmp_path):
    collect(_ns_cfg(tiny_nuscenes, "source.keyframes_only=true", "source.camera=CAM_BACK"), tmp_path)
    for e, name in enumerate(NAMES):
        ep = _episode(tmp_path, e)
        assert len(ep["obs"]) == KEYFRAMES
        np.testing.assert_allclose(ep["obs"].reshape(-1, 3).mean(0), BACK_COLOR, atol=4)
        speed, rate = expected_actions(name)  # 0.5 s apart: the chord is a hair shorter than the arc
        np.testing.assert_allclose(ep["action"][:, 0], speed, rtol=1e-3)
        np.testing.assert_allclose(ep["action"][:, 1], rate, atol=1e-4)


def test_nuscenes_rerun_skips_repairs_and_refuses_another_source(ray_session, tiny_nuscenes, tmp_path):
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
    assert main(["collect", "--out", str(tmp_path), "--set", "source.kind=offline",
                 "--set", f"source.path={tmp_path}", "--set", "env.id="]) == 1
    assert Manifest.load(tmp_path / "data").info["source"]["kind"] == "nuscenes"


def test_nuscenes_refuses_a_run_of_env_rollouts(ray_session, tiny_nuscenes, tmp_path):
    collect(load_config(None, ["collect.episodes=1", "collect.max_steps=5"]), tmp_path)
    with pytest.raises(ValueError, match="holds rollouts of env rayworld/SimpleDriving-v0"):
        collect(_ns_cfg(tiny_nuscenes), tmp_path)


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


def test_pose_actions_wrap_yaw_and_repeat_the_last():
    yaws = [3.0, -3.0, -2.9]  # +0.283 rad across the +-pi seam, then +0.1
    quats = [[np.cos(y / 2), 0, 0, np.sin(y / 2)] for y in yaws]
    a = pose_actions([0, 500_000, 1_500_000], [[0, 0, 5], [3, 4, 9], [3, 4, 9]], quats)
    np.testing.assert_allclose(a, [[10.0, (2 * np.pi - 6.0) / 0.5], [0.0, 0.1], [0.0, 0.1]], rtol=1e-5)
    with pytest.raises(ValueError, match="scene-x: ego pose timestamps 7 then 7 at frames 1, 2"):
        pose_actions([0, 7, 7], [[0, 0, 0]] * 3, quats, where="scene-x")


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
        assert f"{stage} is complete, skipping it" in printed
