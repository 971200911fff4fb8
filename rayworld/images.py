"""PNG artefacts for training runs: reconstruction grids and loss curves, written atomically."""
from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from rayworld.io import atomic_path


def _to_uint8_nhwc(frames) -> np.ndarray:
    if hasattr(frames, "detach"):
        frames = frames.detach().cpu().numpy()
    a = np.asarray(frames)
    if a.ndim == 3:
        a = a[..., None]
    # Accept NCHW too (e.g. straight from the VAE) when the layout is unambiguous.
    if a.shape[-1] not in (1, 3, 4) and a.shape[1] in (1, 3, 4):
        a = a.transpose(0, 2, 3, 1)
    if a.dtype != np.uint8:
        a = np.clip(np.round(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return a[..., :3]


def save_recon_grid(originals, recons, path, cols: int = 8, scale: int = 2) -> None:
    """Originals in one row, their reconstructions in the row below; repeat per `cols` frames."""
    orig, rec = _to_uint8_nhwc(originals), _to_uint8_nhwc(recons)
    if orig.shape != rec.shape:
        raise ValueError(f"originals {orig.shape} and recons {rec.shape} differ in shape")
    n, h, w, _ = orig.shape
    if n == 0:
        raise ValueError("no frames to save")
    ncols = min(cols, n)
    pairs = -(-n // ncols)
    grid = np.zeros((pairs * 2 * h, ncols * w, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        grid[2 * r * h:(2 * r + 1) * h, c * w:(c + 1) * w] = orig[i]
        grid[(2 * r + 1) * h:(2 * r + 2) * h, c * w:(c + 1) * w] = rec[i]
    if scale != 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)  # nearest neighbour
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


def save_curves(history: dict, path, title: str = "") -> None:
    """One subplot per non-empty series, x = epoch 1..n."""
    series = {k: list(v) for k, v in history.items() if v is not None and len(v) > 0}
    n = max(1, len(series))
    ncols = min(3, n)
    nrows = -(-n // ncols)
    # Figure + Agg canvas directly: no pyplot global state, safe in worker threads.
    fig = Figure(figsize=(4 * ncols, 3 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    for i, (key, values) in enumerate(series.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.plot(range(1, len(values) + 1), values, marker="o" if len(values) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def save_dream_vs_real(history: dict, path, horizon: int | None = None) -> None:
    """Evolution on ONE y-axis: the population's fitness per generation, and at each real check
    the CMA-ES mean scored in the dream and in the real env at the same horizon."""
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    gens = range(1, len(history["dream_mean"]) + 1)
    ax.fill_between(gens, history["dream_worst"], history["dream_best"], alpha=0.2,
                    label="fitness: worst to best candidate")
    ax.plot(gens, history["dream_mean"], label="fitness: population mean")
    at = f", {horizon} steps" if horizon else ""
    checks = [(g, d) for g, d in zip(history.get("real_gen", []), history.get("dream_check", []))
              if d is not None]
    if checks:
        ax.plot(*zip(*checks), "o-", color="tab:purple", label=f"CMA-ES mean in the dream{at}")
    if history.get("real_gen"):
        ax.plot(history["real_gen"], history["real_mean"], "s-", color="tab:green",
                label=f"CMA-ES mean in the real env{at}")
    ax.set_xlabel("generation")
    ax.set_ylabel("return")
    ax.set_title("Evolution: dream vs real return")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
