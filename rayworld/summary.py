"""summary.md: a run's figures and pictures on one page."""

from __future__ import annotations

from pathlib import Path

from rayworld.io import atomic_write_text, read_json

ROWS = [
    ("frames_collected", "frames collected", "{:.0f}"),
    ("env_steps_per_s", "env steps/s while collecting", "{:.0f}"),
    ("vae_psnr_db", "VAE held-out PSNR (dB)", "{:.2f}"),
    ("vae_ssim", "VAE held-out SSIM", "{:.3f}"),
    ("mdn_nll", "MDN-RNN held-out NLL (per latent dim)", "{:.3f}"),
    ("mdn_reward_mse", "MDN-RNN held-out reward MSE", "{:.4f}"),
    ("predict_reward_corr", "open-loop predicted vs real reward (correlation)", "{:.2f}"),
    ("predict_done_precision", "open-loop done head: precision", "{:.2f}"),
    ("predict_done_recall", "open-loop done head: recall", "{:.2f}"),
    ("controller_kind", "controller kind", "{}"),
    ("evolve_where", "controller evolved in", "{}"),
    ("dream_return_final", "controller dream return (at the real horizon)", "{:.2f}"),
    ("real_return_mean", "controller real return (mean)", "{:.2f}"),
    ("real_return_std", "controller real return (std)", "{:.2f}"),
    ("random_return_mean", "random policy real return (mean)", "{:.2f}"),
    ("random_return_std", "random policy real return (std)", "{:.2f}"),
    ("episodes", "real episodes per policy", "{:.0f}"),
]
IMAGES = [
    ("vae_recon.png", "VAE: held-out frames (odd rows) over reconstructions (even rows)"),
    ("vae_curves.png", "VAE loss curves"),
    ("mdn_curves.png", "MDN-RNN loss curves"),
    ("predict.png", "World model, open loop on held-out episodes: real frames (odd rows) over "
                    "predictions (even rows) at horizons 1, 5, 10, 30, 100"),
    ("evolve_curves.png", "Evolution: fitness per generation; the CMA-ES mean in the dream and "
                          "the real env at the same horizon"),
    ("dream_vs_real.gif", "The controller in its dream (left) and in the real env (right)"),
]


def write_summary(run_dir) -> Path:
    run_dir = Path(run_dir)
    report = read_json(run_dir / "report.json", {})
    lines = [f"# {run_dir.name}", "", "| figure | value |", "| --- | --- |"]
    for key, label, fmt in ROWS:
        if report.get(key) is not None:
            lines.append(f"| {label} | {fmt.format(report[key])} |")
    if report.get("real_return_se") is not None and report.get("random_return_se") is not None:
        gap = report["real_return_mean"] - report["random_return_mean"]
        se = (report["real_return_se"] ** 2 + report["random_return_se"] ** 2) ** 0.5
        lines.append(f"| controller minus random | {gap:.2f} ({gap / se:.1f} standard errors) |"
                     if se > 0 else f"| controller minus random | {gap:.2f} |")
    for key, label in (("predict_psnr_db", "world model, open loop"),
                       ("predict_psnr_static_db", "first frame held still"),
                       ("predict_psnr_recon_db", "VAE reconstruction")):
        if isinstance(report.get(key), dict):
            cells = ", ".join(f"{h}: {v:.1f}" for h, v in report[key].items() if v is not None)
            lines.append(f"| PSNR (dB) by horizon, {label} | {cells} |")
    walls = report.get("wall_s", {})
    if walls:
        lines += ["", "Wall seconds per stage: " +
                  ", ".join(f"{k} {v:.0f}" for k, v in walls.items()) + "."]
    for name, caption in IMAGES:
        if (run_dir / "images" / name).exists():
            lines += ["", f"## {caption}", "", f"![{caption}](images/{name})"]
    path = run_dir / "summary.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
