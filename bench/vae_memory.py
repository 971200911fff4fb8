"""Peak memory of VAE training does not grow with the data: train-vae on 1x and on 10x the
frames (real SimpleDriving episodes), one epoch each, side by side, and print the ratio of the
peak proportional set size (PSS: shared pages split between the processes that map them) of
the whole process tree (the driver, Ray and its Train workers), and of the Train worker alone;
and the ratio of the Train worker's peak RSS as the kernel counts it (VmHWM), which a sampled
figure cannot miss however short the peak.

    python bench/vae_memory.py [--episodes 30] [--scale 10] [--steps 200]

Target: ratio <= 1.2. Frames stream from the Parquet shards through a bounded shuffle buffer
(`data.shuffle_buffer`, 4,096 frames), so only the epoch's length should grow. The 1x data must
already fill that buffer (30 x 200 = 6,000 frames), or the comparison measures the buffer.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def high_water(pid: int) -> int:
    """The kernel's peak RSS of a process (VmHWM), in bytes: exact, however short the peak."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory(root: psutil.Process) -> tuple[int, int, int]:
    """(PSS of the whole tree, PSS of the Ray Train workers, their peak RSS) in bytes."""
    total = worker = hwm = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0, 0
    for p in procs:
        try:
            pss = p.memory_full_info().pss
            total += pss
            if " ".join(p.cmdline()).startswith("ray::RayTrainWorker"):
                worker += pss
                hwm += high_water(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total, worker, hwm


def rayworld(args: list[str], sample: bool = False) -> tuple[float, tuple[int, int, int]]:
    """Run a rayworld command; (wall seconds, peaks: PSS of its tree, PSS of its Train worker,
    the Train worker's own peak RSS from the kernel)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "rayworld.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    root, peak = psutil.Process(proc.pid), (0, 0, 0)
    while proc.poll() is None:
        if sample:
            peak = tuple(map(max, peak, memory(root)))
        time.sleep(0.2)
    out = proc.stdout.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"rayworld {' '.join(args)} failed:\n{out[-2000:]}")
    return time.perf_counter() - t0, peak


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=30, help="episodes at 1x")
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--steps", type=int, default=200, help="steps per episode")
    args = p.parse_args()
    common = ["--set", "ray.num_cpus=2", "--set", "ray.cpus_per_worker=1",
              "--set", "ray.dashboard=false", "--set", "ray.object_store_mb=200"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="rw-vae-memory-") as tmp:
        for scale in (1, args.scale):
            run = Path(tmp) / f"x{scale}"
            n = args.episodes * scale
            rayworld(["collect", "--out", str(run), "--set", f"collect.episodes={n}",
                      "--set", f"collect.max_steps={args.steps}", *common])
            wall, peak = rayworld(["train-vae", "--out", str(run), "--set", "vae.epochs=1",
                                   *common], sample=True)
            rows.append((scale, n * args.steps, wall, peak))
    print(f"{'data':>5} {'frames':>8} {'wall (s)':>9} {'peak PSS, all (MiB)':>20} "
          f"{'Train worker (MiB)':>19} {'worker peak RSS (MiB)':>22}")
    for scale, frames, wall, (total, worker, hwm) in rows:
        print(f"{scale:>4}x {frames:>8} {wall:>9.1f} {total / 2**20:>20.0f} "
              f"{worker / 2**20:>19.0f} {hwm / 2**20:>22.0f}")
    # PSS is sampled every 0.2 s and can miss a short peak (1x validates in about a second);
    # the kernel's high-water mark cannot
    for i, what in enumerate(("all processes (PSS, sampled)", "Train worker (PSS, sampled)",
                              "Train worker (peak RSS, kernel)")):
        ratio = rows[1][3][i] / max(rows[0][3][i], 1)
        print(f"peak {args.scale}x / 1x, {what}: {ratio:.2f} (target <= 1.2: "
              f"{'PASS' if ratio <= 1.2 else 'FAIL'})")


if __name__ == "__main__":
    main()
