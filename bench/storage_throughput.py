"""A run directory in object storage vs on a local disk: shard writes, a whole pull on a new
machine, and the per-process refresh that finds nothing to do. Side by side in one run,
printed as ratios.

    python bench/storage_throughput.py [--shards 200] [--kb 700] [--repeats 3]

The S3 side is a real S3 server (moto) started here on loopback, so it measures rayworld's
path (atomic write, upload as one object, listing, download) and the server's own cost, not a
network: a cloud bucket adds latency per request and gives more bandwidth per node. Shards are
random bytes of about a CarRacing episode's size (1,000 frames at about 700 bytes each).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def _write(root: Path, blobs: list[bytes]):
    from rayworld.io import atomic_path

    for i, blob in enumerate(blobs):
        with atomic_path(root / "data" / "episodes" / f"ep-{i:06d}.parquet") as tmp:
            tmp.write_bytes(blob)


def _read(root: Path) -> int:
    return sum(len(p.read_bytes()) for p in sorted((root / "data" / "episodes").iterdir()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=200)
    ap.add_argument("--kb", type=int, default=700)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from rayworld import storage

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{host}:{port}")
    boto3.client("s3").create_bucket(Bucket="bench")
    blobs = [os.urandom(args.kb * 1024) for _ in range(args.shards)]
    mb = args.shards * args.kb / 1024
    rows = {"write": ([], []), "pull on a new machine": ([], []), "refresh, nothing new": ([], [])}
    tmp = Path(tempfile.mkdtemp(prefix="rw-bench-storage-"))
    try:
        for r in range(args.repeats):
            local = tmp / f"disk{r}"
            t = time.perf_counter()
            _write(local, blobs)
            rows["write"][0].append(time.perf_counter() - t)
            t = time.perf_counter()
            copy = tmp / f"copy{r}"
            shutil.copytree(local, copy)  # a new machine on a shared disk reads every file
            _read(copy)
            rows["pull on a new machine"][0].append(time.perf_counter() - t)
            t = time.perf_counter()
            _read(local)
            rows["refresh, nothing new"][0].append(time.perf_counter() - t)

            os.environ["RAYWORLD_MIRROR"] = str(tmp / f"mirror{r}")
            uri = f"s3://bench/run{r}"
            mirror = storage.attach(uri)
            t = time.perf_counter()
            _write(mirror, blobs)  # each commit uploads its object
            rows["write"][1].append(time.perf_counter() - t)
            os.environ["RAYWORLD_MIRROR"] = str(tmp / f"other{r}")
            t = time.perf_counter()
            other = storage.attach(uri)
            assert _read(other) == len(blobs) * args.kb * 1024
            rows["pull on a new machine"][1].append(time.perf_counter() - t)
            t = time.perf_counter()
            storage.refresh(other, "data")
            rows["refresh, nothing new"][1].append(time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        server.stop()

    print(f"{args.shards} shards of {args.kb} KB ({mb:.0f} MB), best of {args.repeats}")
    print(f"{'':24} {'local disk':>12} {'S3 (moto, loopback)':>20} {'S3 / disk':>10}")
    for name, (disk, s3) in rows.items():
        d, s = min(disk), min(s3)
        rate = f" ({mb / s:.0f} MB/s)" if name != "refresh, nothing new" else ""
        print(f"{name:24} {d:10.3f} s {s:10.3f} s{rate:>9} {s / d:9.1f}x")


if __name__ == "__main__":
    main()
