"""Peak memory of encoding does not grow with the number of episodes: encode 1x and 10x as
many episodes of distinct lengths, with each episode's last batch padded to one of a few
shapes (what `rayworld encode` does) and, side by side, at its own length (what it did), and
print the ratios of the encoding process's peak RSS as the kernel counts it (VmHWM).

    python bench/encode_memory.py [--episodes 20] [--scale 10]

Target: ratio <= 1.2 with padding. oneDNN keeps kernels and scratch memory per input shape,
and every episode length brings a new last-batch shape, so without padding memory grows with
the number of distinct lengths. Each run is its own process on one thread, as one encode task.
The frames are synthetic (smooth noise, 64x64x3) in real Parquet shards; the VAE is untrained,
which does not change its memory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from vae_memory import high_water  # this script's folder

BATCH = 256  # what encode reads per batch


def child(mode: str, data_dir: str) -> None:
    import torch

    from rayworld.data import iter_frames
    from rayworld.encode import encode_frames, load_vae

    torch.set_num_threads(1)
    model = load_vae(Path(data_dir) / "vae.pt")
    frames = 0
    for f in sorted(Path(data_dir).glob("ep-*.parquet")):
        mus, _ = encode_frames(model, iter_frames([f], (64, 64, 3), BATCH), BATCH,
                               pad=mode == "padded")
        frames += sum(len(m) for m in mus)
    print(frames, high_water(os.getpid()))


def make_data(root: Path, episodes: int, rng) -> None:
    import torch

    from rayworld.data import write_episode
    from rayworld.models.vae import ConvVAE

    root.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({"model": ConvVAE(32).state_dict(), "latent": 32, "epoch": 0}, root / "vae.pt")
    # the same spread of lengths at every scale; each episode's last batch has its own length
    lengths = rng.integers(17, 1000, episodes)
    for e, n in enumerate(lengths):
        base = rng.integers(0, 256, (1, 8, 8, 3)).repeat(8, 1).repeat(8, 2)
        obs = np.clip(base + rng.integers(-8, 9, (n, 64, 64, 3)), 0, 255).astype(np.uint8)
        write_episode(root / f"ep-{e:05d}.parquet", e, obs, np.zeros((n, 3)), np.zeros(n),
                      np.zeros(n, bool), np.zeros(n, bool), {"episode": e})


def run(mode: str, data_dir: Path) -> tuple[int, int, float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(data_dir)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"encoding {data_dir} ({mode}) failed:\n{out.stderr[-2000:]}")
    frames, hwm = map(int, out.stdout.split()[-2:])
    return frames, hwm, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=20, help="episodes at 1x")
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)
    rng = np.random.default_rng(0)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="rw-encode-memory-") as tmp:
        for scale in (1, args.scale):
            data = Path(tmp) / f"x{scale}"
            make_data(data, args.episodes * scale, rng)
            for mode in ("padded", "exact"):
                rows[mode, scale] = run(mode, data)
    print(f"{'last batch':>10} {'data':>5} {'episodes':>8} {'frames':>7} {'wall (s)':>9} "
          f"{'peak RSS (MiB)':>15}")
    for (mode, scale), (frames, hwm, wall) in rows.items():
        print(f"{mode:>10} {scale:>4}x {args.episodes * scale:>8} {frames:>7} {wall:>9.1f} "
              f"{hwm / 2**20:>15.0f}")
    for mode in ("padded", "exact"):
        ratio = rows[mode, args.scale][1] / rows[mode, 1][1]
        verdict = f"target <= 1.2: {'PASS' if ratio <= 1.2 else 'FAIL'}" if mode == "padded" \
            else "what encode did before padding"
        print(f"peak RSS {args.scale}x / 1x, {mode}: {ratio:.2f} ({verdict})")


if __name__ == "__main__":
    main()
