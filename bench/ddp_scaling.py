"""VAE training images/s with N Ray Train DDP workers vs 1, through the real `train_vae`.

    python bench/ddp_scaling.py --run runs/quickstart [--workers 2] [--epochs 1] [--amp off]
    python bench/ddp_scaling.py --run runs/quickstart --gpu --workers 4   # on a GPU node

Both sides train from scratch on the same data with the same per-worker batch, one after the
other in one Ray session. On CPU the single worker gets all the cores (torch threads) and the N
workers share them, so the ratio shows what DDP costs (all-reduce, one process per worker)
rather than added compute; on a GPU node each worker has its own GPU and the ratio is the
speed-up. Prints images/s (Ray Train's per-epoch figure, summed over workers) and the ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def run_once(data_run: Path, workers: int, cpus: float, args) -> float:
    from rayworld.config import load_config
    from rayworld.train.vae import train_vae

    base = load_config(data_run / "config.yaml").to_dict()
    with tempfile.TemporaryDirectory(prefix="rayworld-ddp-") as d:
        run = Path(d)
        (run / "data").symlink_to((data_run / "data").resolve(), target_is_directory=True)
        from rayworld.config import with_values

        cfg = with_values(base, {"ray.num_workers": workers, "ray.cpus_per_worker": cpus,
                                 "ray.use_gpu": args.gpu, "vae.epochs": args.epochs,
                                 "vae.amp": args.amp, "ray.max_failures": 0})
        t0 = time.perf_counter()
        fig = train_vae(cfg, run, log=lambda *a: None)
        print(f"  {workers} worker(s) x {cpus:g} CPU{' + GPU' if args.gpu else ''}: "
              f"{fig['vae_images_per_s']:.0f} images/s (train_vae wall {time.perf_counter() - t0:.0f} s)",
              flush=True)
        return fig["vae_images_per_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a run with collected data")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    p.add_argument("--gpu", action="store_true")
    args = p.parse_args()
    import ray

    cores = os.cpu_count() or 2
    ray.init(num_cpus=cores, include_dashboard=False, object_store_memory=500 * 2**20,
             log_to_driver=False)
    one = run_once(args.run, 1, float(cores) if not args.gpu else 1.0, args)
    many = run_once(args.run, args.workers, cores / args.workers if not args.gpu else 1.0, args)
    print(f"DDP {args.workers} workers vs 1: {many:.0f} vs {one:.0f} images/s, ratio "
          f"{many / one:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
