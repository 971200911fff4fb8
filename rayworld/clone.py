"""Behaviour cloning: a controller fitted to the collected actions, CMA-ES's starting point.

`evolve.init: clone` starts the search from the controller that best imitates the data's
best episodes (filtered behaviour cloning) instead of from zero weights. It learns from
logged data only, never from the real env; after that, CMA-ES trains it in the dream.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from rayworld.data import Manifest, read_series


def clone_inputs(series: Manifest, episodes: list[int], z_sample: bool = False, seed: int = 0):
    """z [N, Z] as the real agent sees it (the VAE mean, or a sample with `controller.z:
    sample`) and the actions [N, A] the data took there, over `episodes`."""
    gen = torch.Generator().manual_seed(seed)
    zs, acts = [], []
    for e in episodes:
        ep = read_series(series.file(e))
        z = torch.tensor(ep["mu"], dtype=torch.float32)
        if z_sample:
            eps = torch.randn(z.shape, generator=gen)
            z = z + torch.exp(0.5 * torch.tensor(ep["logvar"], dtype=torch.float32)) * eps
        zs.append(z)
        acts.append(torch.tensor(ep["action"], dtype=torch.float32))
    return torch.cat(zs), torch.cat(acts)


def best_episodes(episodes: Manifest, series: Manifest, top: float) -> list[int]:
    """The encoded episodes whose real return is in the top `top` fraction (at least one).
    The return comes from the episodes manifest, or from the encoded rewards where it has none."""
    ids = sorted(series.shards)
    ret = {}
    for e in ids:
        r = episodes.shards.get(e, {}).get("return")
        ret[e] = float(r) if r is not None else float(read_series(series.file(e))["reward"].sum())
    keep = max(1, int(round(top * len(ids))))
    return sorted(sorted(ids, key=lambda e: -ret[e])[:keep])


def fit_controller(controller, z, h, actions, epochs: int = 30, batch: int = 1024,
                   lr: float = 3e-3, seed: int = 0, min_steps: int = 600) -> float:
    """Fit in place by Adam: MSE on continuous actions, cross-entropy on discrete ones.
    Runs more epochs than asked when needed to take min_steps Adam steps (a few hundred
    samples would otherwise get one step per epoch). Returns the last epoch's mean loss."""
    epochs = max(epochs, math.ceil(min_steps / math.ceil(len(z) / batch)))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(controller.parameters(), lr=lr)
    loss_sum = 0.0
    with torch.enable_grad():  # a caller's no_grad must not stop the fit
        for _ in range(epochs):
            loss_sum = 0.0
            for idx in torch.randperm(len(z), generator=gen).split(batch):
                if controller.discrete:
                    logits = controller.logits(z[idx], h[idx])
                    loss = torch.nn.functional.cross_entropy(logits, actions[idx, 0].long())
                else:
                    loss = torch.nn.functional.mse_loss(controller(z[idx], h[idx]),
                                                        actions[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss_sum += loss.item() * len(idx)
    return loss_sum / len(z)


def clone_params(run_dir: Path, cfg, log=print) -> np.ndarray:
    """The flat parameters of the controller cloned from the run's best episodes.

    It reads the frame's z alone (its h weights are 0): h carries the last actions, and a
    clone that reads them copies its own last action (it never lets go of a brake once held).
    Evolution may then use h."""
    from rayworld.encode import SERIES
    from rayworld.policies import make_controller
    from rayworld.train.common import load_model_file

    run_dir = Path(run_dir)
    # the controller's shape only: the clone needs neither the MDN-RNN nor the dream's starts
    mdn = load_model_file(run_dir / "checkpoints" / "mdn.pt", "train-mdn")
    latent, hidden, discrete = mdn["latent"], mdn["hidden"], mdn.get("action_n", 0) > 0
    torch.manual_seed(cfg.seed)  # the starting weights too: one seed, one clone
    controller = make_controller(cfg, latent, hidden, mdn["action_n"] if discrete
                                 else mdn["action_dim"], discrete)
    series = Manifest.load(run_dir / "data", SERIES, stage="encode")
    chosen = best_episodes(Manifest.load(run_dir / "data"), series, cfg.evolve.clone_top)
    z, actions = clone_inputs(series, chosen, cfg.controller.z == "sample", cfg.seed)
    loss = fit_controller(controller, z, torch.zeros(len(z), hidden), actions, seed=cfg.seed)
    with torch.no_grad():
        controller.net[0].weight[:, latent:] = 0.0
    log(f"evolve: controller cloned from the best {len(chosen)} of {len(series.shards)} "
        f"episodes ({len(z)} steps), loss {loss:.4f}")
    return controller.get_flat()
