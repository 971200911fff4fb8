"""Diagnose: how far ahead the world model sees, open loop, on held-out real episodes.

From the first real frame's latent, the MDN-RNN is rolled forward with the episode's real
actions and its own deterministic predictions (tau = 0), never seeing another real frame.
Decoded predictions are compared with the real frames at a few horizons, next to two
baselines: the first frame held still (does the model predict motion at all?) and the VAE's
own reconstruction (the best the latent space allows). No Ray: plain torch in this process.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rayworld.config import Config
from rayworld.data import Manifest, iter_frames, read_series, split_episodes
from rayworld.dream import WorldModel
from rayworld.encode import SERIES, load_vae, vae_id
from rayworld.images import save_recon_grid
from rayworld.metrics import psnr
from rayworld.models.mdn import sample_next, select_member
from rayworld.models.vae import to_float
from rayworld.train.common import tb_writer

HORIZONS = (1, 5, 10, 30, 100)
MAX_STEPS = 1000
SHOW = 4  # episodes in images/predict.png


def _frames(path: Path, obs_shape, steps: list[int]) -> np.ndarray:
    """Only the frames at `steps` are kept: a whole episode can be 1000 frames."""
    frames = np.concatenate(list(iter_frames([path], obs_shape, 256)))
    return frames[steps]


def _fmt(value, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


@torch.no_grad()
def diagnose(cfg: Config, run_dir: Path, episodes: int = 32, log=print) -> dict:
    start = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    vae_path = run_dir / "checkpoints" / "vae.pt"
    vae = load_vae(vae_path)
    world = WorldModel.load(run_dir)
    series = Manifest.load(run_dir / "data", SERIES, stage="encode")
    shards = Manifest.load(run_dir / "data")
    if world.latent != vae.latent:
        raise ValueError(f"{run_dir / 'checkpoints' / 'mdn.pt'} has latent {world.latent}, "
                         f"{vae_path} has {vae.latent}; re-run `rayworld encode` and `train-mdn`")
    if series.info.get("vae") != vae_id(vae_path):  # the MDN-RNN learnt another VAE's latents
        log("diagnose: warning: the series were encoded by another VAE; re-run `rayworld encode`")
    held = [e for e in split_episodes(series.shards, cfg.data.val_every)[1] if e in shards.shards]
    held = held[:episodes]
    if not held:
        raise ValueError(f"diagnose: no held-out episodes in {series.path} ({len(series.shards)} "
                         f"encoded); collect more episodes or lower data.val_every")

    eps = [read_series(series.file(e)) for e in held]
    lengths = np.array([min(len(ep["reward"]), MAX_STEPS) for ep in eps])
    b, t_max = len(eps), int(lengths.max())
    mask = np.arange(t_max)[None, :] < lengths[:, None]
    action = np.zeros((b, t_max, eps[0]["action"].shape[1]), np.float32)  # pad: a valid index 0
    reward, terminated = np.zeros((b, t_max)), np.zeros((b, t_max), bool)
    for i, (ep, n) in enumerate(zip(eps, lengths)):
        action[i, :n], reward[i, :n], terminated[i, :n] = (
            ep["action"][:n], ep["reward"][:n], ep["terminated"][:n])

    # Open loop, all episodes in one batch; padded rows run on and are masked out after.
    z = torch.from_numpy(np.stack([ep["mu"][0] for ep in eps]))
    state = world.mdn.initial_state(b)
    pred_reward, pred_done, pred_z = np.zeros((b, t_max)), np.zeros((b, t_max), bool), {}
    for t in range(t_max):
        out, state = world.mdn.step(z, torch.from_numpy(action[:, t]), state)
        out = select_member(out, 0)  # an ensemble's first member
        pred_done[:, t] = (world.done_prob(out.done_logit) > 0.5).numpy()
        z_next = sample_next(out, tau=0)
        r = out.reward
        if world.mdn.reward_from == "latents":
            r = world.mdn.latent_reward(z, z_next)
            r = r[0] if world.mdn.ensemble > 1 else r
        pred_reward[:, t] = r.numpy()
        z = z_next
        if t + 1 in HORIZONS:
            pred_z[t + 1] = z

    # Per horizon: real frame, frame 0, predicted and real latent of every episode that has it.
    psnr_pred, psnr_static, psnr_recon, grid = {}, {}, {}, {}
    frames = [_frames(shards.file(e), tuple(shards.info["obs_shape"]),
                      [0] + [h for h in HORIZONS if h < n]) for e, n in zip(held, lengths)]
    for h in HORIZONS:
        rows = [i for i in range(b) if h < lengths[i]]
        if not rows:
            psnr_pred[str(h)] = psnr_static[str(h)] = psnr_recon[str(h)] = None
            continue
        k = 1 + HORIZONS.index(h)
        real = to_float(np.stack([frames[i][k] for i in rows]))
        first = to_float(np.stack([frames[i][0] for i in rows]))
        pred = vae.decode(pred_z[h][rows])
        recon = vae.decode(torch.from_numpy(np.stack([eps[i]["mu"][h] for i in rows])))
        psnr_pred[str(h)] = float(psnr(pred, real).mean())
        psnr_static[str(h)] = float(psnr(first, real).mean())
        psnr_recon[str(h)] = float(psnr(recon, real).mean())
        grid[h] = {i: (real[j], pred[j]) for j, i in enumerate(rows) if i < SHOW}

    r_real, r_pred = reward[mask], pred_reward[mask]
    corr = (float(np.corrcoef(r_pred, r_real)[0, 1])
            if r_real.std() > 0 and r_pred.std() > 0 else None)
    d_real, d_pred = terminated[mask], pred_done[mask]
    hits = int((d_real & d_pred).sum())
    precision = hits / int(d_pred.sum()) if d_pred.any() else None
    recall = hits / int(d_real.sum()) if d_real.any() else None

    # Grid: one real row and one predicted row per episode; blank where an episode is too short.
    shown = sorted(grid)
    image_path = run_dir / "images" / "predict.png"
    if shown:
        blank = (torch.zeros(3, *shards.info["obs_shape"][:2]),) * 2
        pairs = [grid[h].get(i, blank) for i in range(min(b, SHOW)) for h in shown]
        image_path.parent.mkdir(parents=True, exist_ok=True)
        save_recon_grid(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]),
                        image_path, cols=len(shown))

    writer = tb_writer(run_dir, "diagnose")
    try:
        for h in shown:
            writer.add_scalar(f"diagnose/psnr_db_h{h}", psnr_pred[str(h)])
            writer.add_scalar(f"diagnose/psnr_static_db_h{h}", psnr_static[str(h)])
        for key, value in (("reward_corr", corr), ("done_precision", precision),
                           ("done_recall", recall)):
            if value is not None:
                writer.add_scalar(f"diagnose/{key}", value)
        if shown:
            with Image.open(image_path) as im:
                writer.add_image("diagnose/predict", np.asarray(im.convert("RGB")),
                                 dataformats="HWC")
    finally:
        writer.close()

    log("diagnose: open-loop PSNR "
        + " ".join(f"h{h} {_fmt(psnr_pred[str(h)])}" for h in shown)
        + " dB (static " + " ".join(f"h{h} {_fmt(psnr_static[str(h)])}" for h in shown)
        + ", VAE " + " ".join(f"h{h} {_fmt(psnr_recon[str(h)])}" for h in shown)
        + f"), reward corr {_fmt(corr, '.2f')}, done precision {_fmt(precision, '.2f')} "
        f"recall {_fmt(recall, '.2f')} over {b} held-out episodes")
    return {"predict_psnr_db": psnr_pred, "predict_psnr_static_db": psnr_static,
            "predict_psnr_recon_db": psnr_recon, "predict_reward_corr": corr,
            "predict_done_precision": precision, "predict_done_recall": recall,
            "predict_episodes": b, "wall_s": time.perf_counter() - start}

