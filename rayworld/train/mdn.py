"""Stage 4, train-mdn: the MDN-RNN in a Ray TorchTrainer on the encoded latent series."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from rayworld import storage
from rayworld.config import Config
from rayworld.data import (
    Manifest,
    prefetch,
    rank_share,
    split_episodes,
    stream_episode_chunks,
    stream_windows,
    windows_per_episode,
)
from rayworld.encode import SERIES
from rayworld.telemetry import record
from rayworld.track import Tracker
from rayworld.train import common


def plan(series: Manifest, cfg: Config, world: int):
    train_eps, val_eps = split_episodes(series.shards, cfg.data.val_every)
    m = cfg.mdn
    per_rank = [sum(windows_per_episode(series.shards[e]["steps"], m.seq_len, m.tbptt)
                    for e in rank_share(train_eps, r, world)) for r in range(world)]
    steps = min(per_rank) // m.batch_size // m.grad_accum * m.grad_accum
    if steps == 0:
        raise common.TrainError(
            f"mdn: too few training windows per worker ({min(per_rank)}) for batch_size "
            f"{m.batch_size} x grad_accum {m.grad_accum}; collect more episodes or lower "
            f"mdn.batch_size / mdn.seq_len")
    return train_eps, val_eps, steps


def _batch_to(batch: dict, device, gen: torch.Generator):
    t = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
    eps = torch.randn(t["mu"].shape, generator=gen).to(device)
    z = t["mu"] + torch.exp(0.5 * t["logvar"]) * eps  # sample z as the paper does
    return z[:, :-1], z[:, 1:], t


# Optimiser groups: the recurrent dynamics and the output heads.
GROUPS = {"dynamics": ("lstm",), "heads": ("mdn_head", "reward_head", "done_head")}


def rank_episodes(series: Manifest, cfg: Config, rank: int, world: int):
    """(train, val) episode ids this DDP rank reads; no two ranks share an episode."""
    train_eps, val_eps, _ = plan(series, cfg, world)
    return rank_share(train_eps, rank, world), rank_share(val_eps, rank, world)


def _losses(model, batch, device, gen, m, state=None):
    """The batch's losses and the LSTM state after it (detached; rows with `reset` start at 0)."""
    from rayworld.models.mdn import mdn_loss

    z_in, z_next, t = _batch_to(batch, device, gen)
    if state is not None and "reset" in t:
        keep = (1.0 - t["reset"]).view(1, -1, 1)
        state = tuple(s * keep for s in state)
    out, state = model(z_in, t["action"], state, z_next=z_next)
    out = type(out)(*(o.float() for o in out))  # the loss in float32 under AMP
    weights = None
    if m.ensemble > 1 and model.training:  # online bootstrap: Poisson(1) weights per member
        weights = torch.poisson(torch.ones(m.ensemble, z_in.shape[0], 1), generator=gen)
        weights = weights.to(device)
    losses = mdn_loss(out, z_next, t["reward"], t["done"], mask=t["mask"], z_mask=t["z_mask"],
                      reward_weight=m.reward_weight, done_weight=m.done_weight,
                      done_pos_weight=m.done_pos_weight, weights=weights,
                      reward_mask=t["z_mask"] if m.reward_from == "latents" else None)
    return losses, tuple(s.detach() for s in state)


def _batches(series: Manifest, episodes, m, steps: int, shuffle_buffer: int, seed: int):
    """Truncated backprop through whole episodes (mdn.tbptt), or independent random windows."""
    files = [series.file(e) for e in episodes]
    if m.tbptt:
        return stream_episode_chunks(files, m.seq_len, m.batch_size, steps, seed)
    return stream_windows(files, [series.shards[e]["steps"] for e in episodes], m.seq_len,
                          m.batch_size, steps, shuffle_buffer, seed=seed)


def train_loop(config: dict):
    import ray.train
    import ray.train.torch

    from rayworld.images import save_curves
    from rayworld.models.mdn import MDNRNN
    from rayworld.train.optim import Stepper, param_groups

    cfg, run_dir, rank, world, device = common.worker_setup(config)
    storage.refresh(run_dir / "data" / "series")  # in object storage: on this node
    series = Manifest.load(run_dir / "data", SERIES, stage="encode")
    _, _, steps = plan(series, cfg, world)
    mine, my_val = rank_episodes(series, cfg, rank, world)
    m = cfg.mdn
    action_dim, action_n = int(config["action_dim"]), int(config["action_n"])

    torch.manual_seed(cfg.seed)
    model = MDNRNN(latent=cfg.vae.latent, action_dim=action_dim, hidden=m.hidden,
                   mixtures=m.mixtures, action_n=action_n, dropout=m.dropout,
                   ensemble=m.ensemble, reward_from=m.reward_from).to(device)
    state = common.load_state(ray.train.get_checkpoint())
    start_epoch, history, resumed = 0, {}, []
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError:  # shapes differ: another hidden, mixtures or ensemble size
            raise common.CheckpointError(
                f"the checkpoint under {run_dir / 'checkpoints' / 'mdn'} has another shape than "
                "mdn.hidden / mixtures / ensemble ask for: delete that folder or use a fresh "
                "--out") from None
        start_epoch, history = state["epoch"], state["history"]
        resumed = state.get("resumed_from", []) + [start_epoch]
        if rank == 0:
            common.say(f"mdn: resuming after epoch {start_epoch}")
    model = ray.train.torch.prepare_model(model)
    groups = param_groups(common.unwrap(model), GROUPS,
                          {"dynamics": m.dynamics_lr, "heads": m.head_lr}, m.lr)
    stepper = Stepper(model, groups, m, m.epochs * steps // m.grad_accum, device)
    if state is not None:
        common.load_stepper(stepper, state, "mdn" if rank == 0 else None)
    shards = common.gather_lists(mine, device, world)
    writer = common.tb_writer(run_dir, "mdn") if rank == 0 else None
    tracker = Tracker.open(cfg, run_dir, "train-mdn") if rank == 0 else None
    keys = ("loss", "nll", "reward_mse", "done_bce", "done_acc")
    last = {}
    for epoch in range(start_epoch, m.epochs):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 131 + rank)
        sums = dict.fromkeys(keys, 0.0)
        batches = _batches(series, mine, m, steps, cfg.data.shuffle_buffer,
                           seed=(cfg.seed * 1_000_003 + epoch) * 64 + rank)
        stopped, lstm_state = False, None
        tick = common.Ticker(f"mdn epoch {epoch + 1}/{m.epochs}", steps, on=rank == 0)
        for i, (batch, bad) in enumerate(common.guard(prefetch(batches), "mdn")):
            tick(i)
            # every rank asks before its forward pass, so none is left in a collective
            if common.stop_all_ranks(bad, run_dir, "mdn", device):
                stopped = True
                break
            with stepper.micro_batch():
                losses, lstm_state = _losses(model, batch, device, gen, m, lstm_state)
                msg = common.nonfinite(losses, "mdn", epoch, i, run_dir)
                if common.stop_all_ranks(msg, run_dir, "mdn", device):
                    stopped = True
                    break
                stepper.backward(losses["loss"])
            for k in keys:
                sums[k] += losses[k].item()
        if stopped:
            break
        train_s = time.perf_counter() - t0
        sums = {k: v / world for k, v in common.allreduce_sum(sums, device).items()}
        val = _validate(model, series, my_val, m, device, cfg.seed)
        val = common.allreduce_sum(val, device)
        n = max(val.pop("n"), 1.0)
        metrics = {"epoch": epoch + 1, **{k: sums[k] / steps for k in keys},
                   **{f"val_{k}": val[k] / n for k in keys},
                   "sequences_per_s": steps * m.batch_size * world / train_s,
                   **{f"lr_{k}": lr for k, lr in stepper.lrs.items()}}
        for k, value in metrics.items():
            if k != "epoch":
                history.setdefault(k, []).append(float(value))
        ckpt_state = None
        if rank == 0:
            common.say(f"mdn epoch {epoch + 1}/{m.epochs}: nll {metrics['nll']:.3f} "
                       f"reward_mse {metrics['reward_mse']:.4f} done_acc "
                       f"{metrics['done_acc']:.3f} | val nll {metrics['val_nll']:.3f} "
                       f"done_bce {metrics['val_done_bce']:.3f}")
            record("rayworld_train_loss", metrics["loss"], stage="mdn")
            for k, value in metrics.items():
                writer.add_scalar(f"mdn/{k}", value, epoch + 1)
            writer.flush()
            storage.publish(run_dir, "tensorboard/mdn")  # watchable in a bucket too
            save_curves({k: history[k] for k in ("nll", "val_nll", "reward_mse",
                                                  "val_reward_mse", "done_bce", "val_done_acc")},
                        run_dir / "images" / "mdn_curves.png", "MDN-RNN")
            ckpt_state = {"model": common.unwrap(model).state_dict(), **stepper.state_dict(),
                          "epoch": epoch + 1, "history": history, "resumed_from": resumed,
                          "world_size": world, "rank_episodes": shards}
        if tracker is not None:
            tracker.log({f"mdn/{k}": v for k, v in metrics.items()}, epoch + 1)
        common.report(metrics, ckpt_state)
        last = metrics
    if writer is not None:
        writer.close()
    if tracker is not None:
        tracker.close()
    return last


def _validate(model, series: Manifest, episodes, m, device, seed) -> dict:
    """Sums of the losses over the held-out episodes, each whole from a zero state (weighted
    by episode), or over their windows when mdn.tbptt is off (weighted by window)."""
    from rayworld.data import episode_window, read_series

    sums = {k: 0.0 for k in ("loss", "nll", "reward_mse", "done_bce", "done_acc", "n")}
    if not episodes:
        return sums
    steps = [series.shards[e]["steps"] for e in episodes]
    gen = torch.Generator().manual_seed(seed)
    if m.tbptt:
        def whole(group):
            eps = [read_series(series.file(e)) for e in group]
            longest = max(len(ep["reward"]) for ep in eps)
            rows = [episode_window(ep, 0, longest) for ep in eps]
            return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

        batches = (whole(episodes[i:i + m.batch_size])
                   for i in range(0, len(episodes), m.batch_size))
    else:
        n_windows = sum(windows_per_episode(s, m.seq_len) for s in steps)
        batches = stream_windows([series.file(e) for e in episodes], steps, m.seq_len,
                                 min(m.batch_size, n_windows), max(1, n_windows // m.batch_size),
                                 10**9, seed=seed)
    model.eval()
    with torch.no_grad():
        for batch in batches:
            losses, _ = _losses(model, batch, device, gen, m)
            b = len(batch["mu"])
            for k in sums:
                if k != "n":
                    sums[k] += float(losses[k]) * b
            sums["n"] += b
    model.train()
    return sums


def train_mdn(cfg: Config, run_dir: Path, log=print, callbacks: list | None = None) -> dict:
    start = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    episodes = Manifest.load(run_dir / "data")
    series = Manifest.load(run_dir / "data", SERIES, stage="encode")
    vae = common.load_model_file(run_dir / "checkpoints" / "vae.pt", "train-vae")
    if vae["latent"] != cfg.vae.latent:
        raise common.TrainError(f"mdn: checkpoints/vae.pt has latent {vae['latent']}, config "
                                f"vae.latent is {cfg.vae.latent}; re-run train-vae")
    action_dim = int(episodes.info["action_dim"])
    action_n = int(episodes.info.get("action_n", 0)) if episodes.info.get("discrete") else 0
    result = common.fit(train_loop, cfg, run_dir, "mdn",
                        {"action_dim": action_dim, "action_n": action_n}, callbacks=callbacks)
    state = common.export_model(result, run_dir / "checkpoints" / "mdn.pt", {
        "latent": cfg.vae.latent, "action_dim": action_dim, "action_n": action_n,
        "hidden": cfg.mdn.hidden,
        "mixtures": cfg.mdn.mixtures, "dropout": cfg.mdn.dropout, "ensemble": cfg.mdn.ensemble,
        "reward_from": cfg.mdn.reward_from,
        "vae": series.info.get("vae"),
        "done_pos_weight": cfg.mdn.done_pos_weight})
    hist = state["history"]
    figures = {"mdn_epochs": state["epoch"], "mdn_nll": hist["val_nll"][-1],
               "mdn_train_nll": hist["nll"][-1], "mdn_reward_mse": hist["val_reward_mse"][-1],
               "mdn_done_bce": hist["val_done_bce"][-1], "mdn_done_acc": hist["val_done_acc"][-1],
               "wall_s": time.perf_counter() - start}
    log(f"train-mdn: held-out NLL {figures['mdn_nll']:.3f}, reward MSE "
        f"{figures['mdn_reward_mse']:.4f}, done acc {figures['mdn_done_acc']:.3f}")
    if len(series.shards) >= 2:  # open-loop prediction on held-out episodes
        from rayworld.diagnose import diagnose

        found = diagnose(cfg, run_dir, log=log)
        found.pop("wall_s")
        figures.update(found)
    figures["wall_s"] = time.perf_counter() - start
    return figures

