"""Stage 3, encode: the trained VAE turns every episode into latents once (the paper's "series").

The MDN-RNN then trains on (mu, logvar) per step and samples z from them each time, instead of
re-encoding frames every epoch. Episodes are encoded in parallel Ray tasks. The series manifest
records which VAE encoded it; a new VAE re-encodes everything.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray
import torch

from rayworld import storage
from rayworld.config import Config
from rayworld.data import (
    Manifest,
    ShardError,
    first_latents,
    iter_frames,
    list_array,
    load_starts,
    open_shard,
    save_starts,
    shard_name,
    write_series,
)
from rayworld.io import file_id, progress
from rayworld.train.common import load_model_file

SERIES = "series.json"


def vae_id(path: Path) -> str:
    return file_id(path)


def load_vae(path: Path):
    from rayworld.models.vae import ConvVAE

    state = load_model_file(path, "train-vae")
    model = ConvVAE(latent=state["latent"])
    model.load_state_dict(state["model"])
    return model.eval()


def padded_size(n: int, batch: int) -> int:
    """The batch length that `n` frames are encoded at: the next power of two (at least 16),
    at most `batch`. oneDNN keeps kernels and scratch memory per input shape, and each
    episode's last batch would otherwise bring a new one; this bounds them to a handful."""
    return min(batch, max(16, 1 << (n - 1).bit_length()))


def encode_frames(model, batches, batch: int, pad: bool = True) -> tuple[list, list]:
    """(mu, logvar) of every frame, per batch; short batches are zero-padded to
    `padded_size` and the padding's outputs dropped (`pad=False` only for bench/)."""
    mus, logvars = [], []
    with torch.no_grad():
        for frames in batches:
            n = len(frames)
            size = padded_size(n, batch) if pad else n
            if size > n:
                frames = np.concatenate([frames, np.zeros((size - n, *frames.shape[1:]),
                                                          frames.dtype)])
            x = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0)
            mu, logvar = model.encode(x)
            mus.append(mu[:n].numpy())
            logvars.append(logvar[:n].numpy())
    return mus, logvars


def _encode_episodes(vae_path: str, data_dir: str, jobs: list, obs_shape, batch: int,
                     threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    model = load_vae(Path(vae_path))
    out = []
    for episode, file in jobs:
        src = Path(data_dir) / file
        storage.refresh(src)  # a run in object storage: this node's copy
        table = open_shard(src).read(columns=["action", "reward", "terminated", "truncated"])
        mus, logvars = encode_frames(model, iter_frames([src], obs_shape, batch), batch)
        name = f"series/{shard_name(episode)}"
        size = write_series(Path(data_dir) / name, episode, np.concatenate(mus),
                            np.concatenate(logvars), list_array(table.column("action")),
                            table.column("reward").to_numpy(),
                            table.column("terminated").to_numpy(zero_copy_only=False),
                            table.column("truncated").to_numpy(zero_copy_only=False),
                            meta={"episode": episode})
        out.append({"episode": episode, "file": name, "steps": table.num_rows, "bytes": size,
                    "start": (mus[0][0], logvars[0][0])})
    return out


def encode(cfg: Config, run_dir: Path, log=print) -> dict:
    start = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    data_dir = run_dir / "data"
    vae_path = run_dir / "checkpoints" / "vae.pt"
    episodes = Manifest.load(data_dir)
    if not vae_path.exists():
        raise FileNotFoundError(f"{vae_path} not found: run `rayworld train-vae` first")
    vid = vae_id(vae_path)
    series = Manifest.load_or_new(data_dir, {"vae": vid}, name=SERIES)
    if series.info.get("vae") != vid:
        log("encode: the VAE changed since the last encoding; encoding every episode again")
        series = Manifest(data_dir, {"vae": vid}, {}, SERIES)
    for e in list(series.shards):  # drop entries whose file is gone or unreadable
        try:
            open_shard(series.file(e))
        except ShardError:
            del series.shards[e]
    todo = sorted(e for e in episodes.shards if e not in series.shards)
    starts = load_starts(data_dir, vid)
    on_disk = set(starts)
    if todo:
        cpus = max(1, int(ray.available_resources().get("CPU", 1)))
        n_tasks = min(len(todo), cpus * 4)
        task = ray.remote(num_cpus=1, max_retries=3)(_encode_episodes)
        obs_shape = tuple(episodes.info["obs_shape"])
        refs = [task.remote(str(vae_path), str(data_dir),
                            [(e, episodes.shards[e]["file"]) for e in todo[i::n_tasks]],
                            obs_shape, 256, 1) for i in range(n_tasks)]
        with progress(len(todo), "encode") as bar:
            while refs:
                done, refs = ray.wait(refs, num_returns=1)
                for entry in ray.get(done[0]):
                    starts[entry["episode"]] = entry.pop("start")
                    series.shards[entry.pop("episode")] = entry
                    bar.update(1)
                series.save()
    series.save()
    missing = [e for e in series.shards if e not in starts]  # encoded before starts.npz
    starts.update({e: first_latents(series.file(e)) for e in missing})
    if on_disk != set(series.shards):
        save_starts(data_dir, vid, {e: starts[e] for e in series.shards})
    wall = time.perf_counter() - start
    log(f"encode: {len(series.shards)} episodes as latents ({len(todo)} new)")
    return {"encoded_episodes": len(series.shards), "wall_s": wall}
