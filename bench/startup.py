"""Dream-actor start-up vs episode count: every encoded episode's first latent read from one
file written at encode time (data/series/starts.npz) vs opened from each episode's series file
(how every actor started before). Side by side on the same synthetic series, printed as a ratio.

    python bench/startup.py [--episodes 100 1000 10000] [--steps 1000] [--repeats 3]

The series are written once per count under a temporary directory, `--steps` steps each (a
per-file read opens only the first row group, so length matters little). A local disk is the
best case for per-file reads: on object storage each file is a request, so the gap widens.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from rayworld.data import Manifest, first_latents, save_starts, start_latents, write_series
from rayworld.encode import SERIES

LATENT, ACTION = 32, 3


def make_series(root: Path, episodes: int, steps: int) -> Manifest:
    rng = np.random.default_rng(0)
    series = Manifest(root, {"vae": "bench"}, {}, SERIES)
    for e in range(episodes):
        name = f"series/ep-{e:06d}.parquet"
        mu = rng.normal(size=(steps, LATENT)).astype(np.float32)
        size = write_series(root / name, e, mu, mu * 0 - 1, np.zeros((steps, ACTION)),
                            np.zeros(steps), np.zeros(steps, bool), np.zeros(steps, bool),
                            meta={"episode": e})
        series.shards[e] = {"file": name, "steps": steps, "bytes": size}
    series.save()
    save_starts(root, "bench", {e: first_latents(series.file(e)) for e in series.shards})
    return series


def per_file(series: Manifest):
    pairs = [first_latents(series.file(e)) for e in sorted(series.shards)]
    return np.stack([m for m, _ in pairs])


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"{'episodes':>9} {'starts.npz (s)':>15} {'per file (s)':>13} {'ratio':>7}")
    for n in args.episodes:
        root = Path(tempfile.mkdtemp(prefix="rw-startup-"))
        try:
            series = make_series(root, n, args.steps)
            one = best_of(lambda r=root: start_latents(Manifest.load(r, SERIES)), args.repeats)
            many = best_of(lambda r=root: per_file(Manifest.load(r, SERIES)), args.repeats)
            assert np.array_equal(start_latents(series)[0], per_file(series))
            print(f"{n:>9} {one:>15.4f} {many:>13.4f} {many / one:>6.1f}x")
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
