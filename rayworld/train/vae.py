"""Stage 2, train-vae: the ConvVAE in a Ray TorchTrainer, streaming frames from the shards."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from rayworld import storage
from rayworld.config import Config
from rayworld.data import Manifest, iter_frames, prefetch, rank_share, split_episodes, stream_frames
from rayworld.telemetry import record
from rayworld.track import Tracker
from rayworld.train import common


def plan(manifest: Manifest, cfg: Config, world: int):
    """Train/val episodes and the batches per epoch that every rank can fill."""
    train_eps, val_eps = split_episodes(manifest.shards, cfg.data.val_every)
    per_rank = [sum(manifest.shards[e]["steps"] for e in rank_share(train_eps, r, world))
                for r in range(world)]
    # Whole optimiser steps only, so every rank takes the same number of them.
    steps = min(per_rank) // cfg.vae.batch_size // cfg.vae.grad_accum * cfg.vae.grad_accum
    if steps == 0:
        raise common.TrainError(
            f"vae: too few training frames per worker ({min(per_rank)}) for batch_size "
            f"{cfg.vae.batch_size} x grad_accum {cfg.vae.grad_accum}; collect more episodes or "
            f"lower vae.batch_size")
    return train_eps, val_eps, steps


def _to_x(batch: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255.0)


# Optimiser groups: the encoder side (up to mu, logvar) and the decoder side.
GROUPS = {"encoder": ("encoder", "fc_mu", "fc_logvar"), "decoder": ("fc_dec", "decoder")}


def make_stepper(model, v, total_steps: int, device):
    from rayworld.train.optim import Stepper, param_groups

    groups = param_groups(common.unwrap(model), GROUPS,
                          {"encoder": v.encoder_lr, "decoder": v.decoder_lr}, v.lr)
    return Stepper(model, groups, v, total_steps, device)


def step_losses(model, x: torch.Tensor, beta: float, kl_tolerance: float,
                foreground_weight: float = 0.0) -> dict:
    """Forward and loss of one micro-batch; the loss itself is summed in float32 under AMP."""
    from rayworld.models.vae import vae_loss

    x_hat, mu, logvar = model(x)
    return vae_loss(x, x_hat.float(), mu.float(), logvar.float(), beta, kl_tolerance,
                    foreground_weight)


def evaluate(model, files, obs_shape, batch_size, device, beta, kl_tol, stride=1):
    """Sums over held-out frames: loss, recon, kl, PSNR, SSIM; plus every stride-th frame (16)."""
    from rayworld.metrics import psnr, ssim
    from rayworld.models.vae import vae_loss

    sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0, "psnr": 0.0, "ssim": 0.0, "n": 0.0}
    originals, recons = [], []
    model.eval()
    with torch.no_grad():
        for batch in iter_frames(files, obs_shape, batch_size):
            x = _to_x(batch, device)
            x_hat, mu, logvar = model(x)
            # the plain loss: held-out batches are one episode each, so a median frame
            # there would call different pixels foreground than the shuffled training batches
            losses = vae_loss(x, x_hat, mu, logvar, beta, kl_tol)
            n = len(x)
            for k in ("loss", "recon", "kl"):
                sums[k] += float(losses[k]) * n
            sums["psnr"] += float(psnr(x_hat, x).sum())
            sums["ssim"] += float(ssim(x_hat, x).sum())
            sums["n"] += n
            pick = np.arange(-int(sums["n"] - n) % stride, n, stride)[:16 - len(originals)]
            originals.extend(batch[pick])
            recons.extend((x_hat[pick].permute(0, 2, 3, 1).cpu().numpy() * 255).round()
                          .astype(np.uint8))
    model.train()
    sample = (np.stack(originals), np.stack(recons)) if originals else None
    return sums, sample


def train_loop(config: dict):
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    from rayworld.images import save_curves, save_recon_grid
    from rayworld.models.vae import ConvVAE, kl_beta

    cfg, run_dir, rank, world, device = common.worker_setup(config)
    manifest = Manifest.load(run_dir / "data")
    obs_shape = tuple(manifest.info["obs_shape"])
    train_eps, val_eps, steps = plan(manifest, cfg, world)
    my_train = [manifest.file(e) for e in rank_share(train_eps, rank, world)]
    my_val = [manifest.file(e) for e in rank_share(val_eps, rank, world)]
    val_frames = sum(manifest.shards[e]["steps"] for e in rank_share(val_eps, rank, world))
    storage.refresh_files(my_train + my_val)  # a run in object storage: this rank's shards
    v = cfg.vae

    torch.manual_seed(cfg.seed)
    model = ConvVAE(latent=v.latent).to(device)
    state = common.load_state(ray.train.get_checkpoint())
    start_epoch, global_step, history, resumed = 0, 0, {}, []
    if state is not None:
        model.load_state_dict(state["model"])
        start_epoch, global_step, history = state["epoch"], state["step"], state["history"]
        resumed = state.get("resumed_from", []) + [start_epoch]
        if rank == 0:
            common.say(f"vae: resuming after epoch {start_epoch}")
    model = ray.train.torch.prepare_model(model)
    stepper = make_stepper(model, v, v.epochs * steps // v.grad_accum, device)
    if state is not None:
        common.load_stepper(stepper, state, "vae" if rank == 0 else None)
    writer = common.tb_writer(run_dir, "vae") if rank == 0 else None
    tracker = Tracker.open(cfg, run_dir, "train-vae") if rank == 0 else None
    last = {}
    for epoch in range(start_epoch, v.epochs):
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
        batches = stream_frames(my_train, obs_shape, v.batch_size, steps, cfg.data.shuffle_buffer,
                                seed=(cfg.seed * 1_000_003 + epoch) * 64 + rank)
        stopped = False
        tick = common.Ticker(f"vae epoch {epoch + 1}/{v.epochs}", steps, on=rank == 0)
        for i, (batch, bad) in enumerate(common.guard(prefetch(batches), "vae")):
            tick(i)
            # every rank asks before its forward pass, so none is left in a collective
            if common.stop_all_ranks(bad, run_dir, "vae", device):
                stopped = True
                break
            x = _to_x(batch, device)
            beta = kl_beta(global_step, v.beta, v.kl_warmup_steps)
            with stepper.micro_batch():
                losses = step_losses(model, x, beta, v.kl_tolerance, v.foreground_weight)
                msg = common.nonfinite(losses, "vae", epoch, i, run_dir)
                if common.stop_all_ranks(msg, run_dir, "vae", device):
                    stopped = True
                    break
                stepper.backward(losses["loss"])
            global_step += 1
            for k in sums:
                sums[k] += losses[k].item()
        if stopped:
            break
        train_s = time.perf_counter() - t0
        sums = {k: v / world for k, v in common.allreduce_sum(sums, device).items()}
        val, sample = evaluate(model, my_val, obs_shape, 256, device,
                               kl_beta(global_step, v.beta, v.kl_warmup_steps), v.kl_tolerance,
                               stride=max(1, val_frames // 16))
        val = common.allreduce_sum(val, device)
        n = max(val["n"], 1.0)
        metrics = {
            "epoch": epoch + 1, "loss": sums["loss"] / steps, "recon": sums["recon"] / steps,
            "kl": sums["kl"] / steps, "val_loss": val["loss"] / n, "val_recon": val["recon"] / n,
            "val_kl": val["kl"] / n, "psnr_db": val["psnr"] / n, "ssim": val["ssim"] / n,
            "images_per_s": steps * v.batch_size * world / train_s, "val_frames": int(val["n"]),
            **{f"lr_{k}": lr for k, lr in stepper.lrs.items()},
        }
        for k, value in metrics.items():
            if k not in ("epoch", "val_frames"):
                history.setdefault(k, []).append(float(value))
        ckpt_state = None
        if rank == 0:
            common.say(f"vae epoch {epoch + 1}/{v.epochs}: loss {metrics['loss']:.2f} "
                       f"recon {metrics['recon']:.2f} kl {metrics['kl']:.2f} | held-out PSNR "
                       f"{metrics['psnr_db']:.2f} dB SSIM {metrics['ssim']:.3f} | "
                       f"{metrics['images_per_s']:.0f} img/s")
            record("rayworld_train_loss", metrics["loss"], stage="vae")
            for k, value in metrics.items():
                writer.add_scalar(f"vae/{k}", value, epoch + 1)
            images = run_dir / "images"
            if sample is not None:
                save_recon_grid(sample[0], sample[1], images / "vae_recon.png")
                grid = np.concatenate([np.concatenate(list(sample[0][:8]), 1),
                                       np.concatenate(list(sample[1][:8]), 1)], 0)
                writer.add_image("vae/recon", grid, epoch + 1, dataformats="HWC")
            save_curves({k: history[k] for k in ("loss", "recon", "kl", "val_loss", "psnr_db",
                                                  "ssim")}, images / "vae_curves.png", "VAE")
            writer.flush()
            storage.publish(run_dir, "tensorboard/vae")  # watchable in a bucket too
            ckpt_state = {"model": common.unwrap(model).state_dict(), **stepper.state_dict(),
                          "epoch": epoch + 1, "step": global_step, "history": history,
                          "resumed_from": resumed, "world_size": world}
        if tracker is not None:
            tracker.log({f"vae/{k}": v for k, v in metrics.items()}, epoch + 1)
        common.report(metrics, ckpt_state)
        last = metrics
    if writer is not None:
        writer.close()
    if tracker is not None:
        tracker.close()
    return last


def train_vae(cfg: Config, run_dir: Path, log=print, callbacks: list | None = None) -> dict:
    """Train (or resume) the VAE; writes checkpoints/vae.pt and returns the stage's figures."""
    start = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    manifest = Manifest.load(run_dir / "data")  # fail early, before any worker starts
    result = common.fit(train_loop, cfg, run_dir, "vae", callbacks=callbacks)
    state = common.export_model(result, run_dir / "checkpoints" / "vae.pt", {
        "latent": cfg.vae.latent, "obs_shape": manifest.info["obs_shape"]})
    hist = state["history"]
    figures = {
        "vae_epochs": state["epoch"], "vae_psnr_db": hist["psnr_db"][-1],
        "vae_ssim": hist["ssim"][-1], "vae_val_loss": hist["val_loss"][-1],
        "vae_images_per_s": hist["images_per_s"][-1], "wall_s": time.perf_counter() - start,
    }
    log(f"train-vae: held-out PSNR {figures['vae_psnr_db']:.2f} dB, SSIM "
        f"{figures['vae_ssim']:.3f} after {state['epoch']} epochs")
    return figures
