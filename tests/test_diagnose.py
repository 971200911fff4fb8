"""Open-loop prediction diagnostics on a tiny run built by hand (no Ray, untrained models)."""

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from rayworld.config import Config
from rayworld.data import Manifest, shard_name, write_episode, write_series
from rayworld.diagnose import diagnose
from rayworld.encode import SERIES, vae_id
from rayworld.models.mdn import MDNRNN
from rayworld.models.vae import ConvVAE, to_float

ENV_ID = "rayworld/SimpleDriving-v0"


def build_run(run_dir: Path, episodes: int = 4, max_steps: int = 40, latent: int = 8,
              hidden: int = 32, seed: int = 0) -> Path:
    """A run directory as collect, train-vae, encode and train-mdn leave it, without Ray.

    SimpleDriving episodes from the drive policy, an untrained ConvVAE and MDNRNN saved as
    export_model saves them, and the episodes encoded by that VAE into the series.
    """
    from rayworld.envs.simple_driving import SimpleDrivingEnv
    from rayworld.policies import make_policy, run_episode

    torch.manual_seed(seed)
    data_dir, ckpt = run_dir / "data", run_dir / "checkpoints"
    ckpt.mkdir(parents=True)
    env = SimpleDrivingEnv(max_steps=max_steps)
    obs_shape = list(env.observation_space.shape)
    shards = Manifest(data_dir, {"env_id": ENV_ID, "obs_shape": obs_shape, "action_dim": 3,
                                 "discrete": False, "action_n": 0}, {})
    rollouts = {}
    for e in range(episodes):
        policy = make_policy("drive", env.action_space, seed + e, 0.25)
        rollouts[e] = run_episode(env, policy, seed + e, max_steps)
        obs, actions, rewards, terms, truncs = rollouts[e]
        name = f"episodes/{shard_name(e)}"
        size = write_episode(data_dir / name, e, obs, actions, rewards, terms, truncs,
                             meta={"env_id": ENV_ID, "episode": e, "seed": seed + e})
        shards.shards[e] = {"file": name, "steps": len(obs), "return": float(rewards.sum()),
                            "bytes": size}
    env.close()
    shards.save()

    vae = ConvVAE(latent=latent).eval()
    torch.save({"model": vae.state_dict(), "epoch": 0, "latent": latent,
                "obs_shape": obs_shape}, ckpt / "vae.pt")
    mdn = MDNRNN(latent=latent, action_dim=3, hidden=hidden, mixtures=3)
    torch.save({"model": mdn.state_dict(), "epoch": 0, "latent": latent, "action_dim": 3,
                "action_n": 0, "hidden": hidden, "mixtures": 3, "vae": vae_id(ckpt / "vae.pt"),
                "done_pos_weight": 1.0}, ckpt / "mdn.pt")

    series = Manifest(data_dir, {"vae": vae_id(ckpt / "vae.pt")}, {}, SERIES)
    for e, (obs, actions, rewards, terms, truncs) in rollouts.items():
        with torch.no_grad():
            mu, logvar = vae.encode(to_float(obs))
        name = f"series/{shard_name(e)}"
        size = write_series(data_dir / name, e, mu.numpy(), logvar.numpy(), actions, rewards,
                            terms, truncs, meta={"episode": e})
        series.shards[e] = {"file": name, "steps": len(obs), "bytes": size}
    series.save()
    return run_dir


def tiny_cfg(val_every: int = 2) -> Config:
    cfg = Config()
    cfg.data.val_every = val_every
    return cfg


def test_diagnose_open_loop_metrics_image_and_tensorboard(tmp_path):
    run = build_run(tmp_path / "run")
    logs = []
    out = diagnose(tiny_cfg(), run, log=logs.append)

    held = [1, 3]  # val_every 2 holds out the odd episodes
    lengths = [Manifest.load(run / "data").shards[e]["steps"] for e in held]
    assert out["predict_episodes"] == 2
    for key in ("predict_psnr_db", "predict_psnr_static_db", "predict_psnr_recon_db"):
        assert set(out[key]) == {"1", "5", "10", "30", "100"}
        for h, value in out[key].items():
            if any(int(h) < n for n in lengths):
                assert isinstance(value, float) and math.isfinite(value), (key, h, value)
            else:
                assert value is None, (key, h, value)
    assert out["predict_psnr_db"]["100"] is None  # episodes are at most 40 steps
    corr = out["predict_reward_corr"]
    assert corr is None or -1.0 <= corr <= 1.0
    for key in ("predict_done_precision", "predict_done_recall"):
        assert out[key] is None or 0.0 <= out[key] <= 1.0
    assert out["wall_s"] > 0
    assert len(logs) == 1 and logs[0].startswith("diagnose: open-loop PSNR h1 ")

    cols = sum(v is not None for v in out["predict_psnr_db"].values())
    with Image.open(run / "images" / "predict.png") as im:
        assert im.format == "PNG"
        assert im.size == (cols * 64 * 2, 2 * 2 * 64 * 2)  # 2 episodes x (real, predicted), scale 2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run / "tensorboard" / "diagnose").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(run / "tensorboard" / "diagnose"))
    acc.Reload()
    [scalar] = acc.Scalars("diagnose/psnr_db_h1")
    assert scalar.value == pytest.approx(out["predict_psnr_db"]["1"], rel=1e-5)
    assert "diagnose/predict" in acc.Tags()["images"]


def test_diagnose_truncated_mdn_checkpoint_is_one_line(tmp_path):
    run = build_run(tmp_path / "run", episodes=2, max_steps=8)
    path = run / "checkpoints" / "mdn.pt"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError) as err:
        diagnose(tiny_cfg(), run)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "train-mdn" in msg


def test_diagnose_without_held_out_episodes_says_so(tmp_path):
    run = build_run(tmp_path / "run", episodes=1, max_steps=8)
    with pytest.raises(ValueError, match="no held-out episodes.*val_every") as err:
        diagnose(tiny_cfg(), run)
    assert "\n" not in str(err.value)

