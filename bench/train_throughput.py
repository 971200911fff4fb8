"""VAE training images/s: the real streaming Parquet path vs the same model on in-memory tensors.

    python bench/train_throughput.py [--run runs/quickstart] [--steps 60] [--threads 2]

Without --run it first collects a small SimpleDriving data set into a temporary run directory.
Both sides run the same training step, one after the other in this process, on the same
threads. Target: streaming >= 0.8 x in-memory.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rayworld.data import Manifest, iter_frames, prefetch, split_episodes, stream_frames
from rayworld.models.vae import ConvVAE, vae_loss


def train_rate(batches, steps: int, batch_size: int) -> float:
    torch.manual_seed(0)
    model = ConvVAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    it = iter(batches)
    t0 = None
    for i in range(steps + 3):
        if i == 3:  # skip warm-up steps
            t0 = time.perf_counter()
        x = torch.from_numpy(next(it)).permute(0, 3, 1, 2).float().div_(255.0)
        x_hat, mu, logvar = model(x)
        loss = vae_loss(x, x_hat, mu, logvar)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch_size / (time.perf_counter() - t0)


def ensure_data(run: Path | None) -> Path:
    if run is not None:
        return run
    import ray

    from rayworld.collect import collect
    from rayworld.config import load_config

    run = Path(tempfile.mkdtemp(prefix="rayworld-bench-"))
    cfg = load_config(None, ["collect.episodes=24", "collect.max_steps=200"])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
             log_to_driver=False)
    collect(cfg, run)
    ray.shutdown()
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=None)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = ensure_data(args.run)
    manifest = Manifest.load(run / "data")
    train, _ = split_episodes(manifest.shards, 10)
    files = [manifest.file(e) for e in train]
    shape = tuple(manifest.info["obs_shape"])
    n_batches = args.steps + 3

    # In memory: every frame decoded up front, batches drawn by index.
    frames = np.concatenate(list(iter_frames(files, shape, 256)))
    rng = np.random.default_rng(0)
    in_memory = (frames[rng.integers(0, len(frames), args.batch_size)] for _ in range(n_batches))
    rate_mem = train_rate(in_memory, args.steps, args.batch_size)

    streaming = prefetch(stream_frames(files, shape, args.batch_size, n_batches, 4096, 1))
    rate_stream = train_rate(streaming, args.steps, args.batch_size)

    ratio = rate_stream / rate_mem
    print(f"data: {len(files)} shards, {manifest.frames} frames, threads {args.threads}")
    print(f"in-memory tensors : {rate_mem:8.1f} images/s")
    print(f"streaming Parquet : {rate_stream:8.1f} images/s")
    print(f"ratio streaming/in-memory: {ratio:.2f} (target >= 0.80: "
          f"{'PASS' if ratio >= 0.8 else 'FAIL'})")


if __name__ == "__main__":
    main()
