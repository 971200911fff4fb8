"""Rollout data on disk: one Parquet shard per episode, a manifest, and streaming readers.

Layout of a run's data directory::

    data/episodes/ep-000012.parquet   one row per env step of episode 12
    data/manifest.json                the completed shards (episode -> file, steps, return)
    data/series/ep-000012.parquet     the same episode as VAE latents (mu, logvar), for the MDN-RNN
    data/series/starts.npz            every encoded episode's first latent, for dream start-up
    data/series.json                  the encoded episodes, and which VAE encoded them

A shard holds a whole episode, so "exactly once" is per file: a shard appears under its final
name only when complete (written to a temporary name, then renamed). Readers stream row groups
and never hold the whole dataset.
"""

from __future__ import annotations

import queue
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayworld.io import atomic_path, atomic_write_json, progress, read_json
from rayworld.storage import refresh

SCHEMA_VERSION = 1
VERSION_KEY = b"rayworld.schema_version"
ROW_GROUP = 256


class ShardError(ValueError):
    """A shard that cannot be used: corrupt, truncated, or of another schema version."""


def shard_name(episode: int) -> str:
    return f"ep-{episode:06d}.parquet"


def episode_schema(obs_shape, action_dim: int, meta: dict) -> pa.Schema:
    fields = [
        ("episode", pa.int64()),
        ("step", pa.int32()),
        ("obs", pa.binary(int(np.prod(obs_shape)))),  # raw HxWxC uint8 bytes
        ("action", pa.list_(pa.float32(), action_dim)),
        ("reward", pa.float32()),
        ("terminated", pa.bool_()),
        ("truncated", pa.bool_()),
    ]
    return pa.schema(fields, metadata=_metadata(meta, obs_shape=list(obs_shape)))


def series_schema(latent: int, action_dim: int, meta: dict) -> pa.Schema:
    fields = [
        ("episode", pa.int64()),
        ("step", pa.int32()),
        ("mu", pa.list_(pa.float32(), latent)),
        ("logvar", pa.list_(pa.float32(), latent)),
        ("action", pa.list_(pa.float32(), action_dim)),
        ("reward", pa.float32()),
        ("terminated", pa.bool_()),
        ("truncated", pa.bool_()),
    ]
    return pa.schema(fields, metadata=_metadata(meta))


def _metadata(meta: dict, **extra) -> dict:
    out = {VERSION_KEY: str(SCHEMA_VERSION).encode()}
    for key, value in {**meta, **extra}.items():
        out[f"rayworld.{key}".encode()] = str(value).encode()
    return out


def _fixed_list(values: np.ndarray, width: int) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, width)


def write_episode(path: Path, episode: int, obs: np.ndarray, actions: np.ndarray,
                  rewards: np.ndarray, terminated: np.ndarray, truncated: np.ndarray,
                  meta: dict, compression: str = "zstd") -> int:
    """Write one episode atomically; returns the file size in bytes."""
    n = len(obs)
    actions = np.asarray(actions, np.float32).reshape(n, -1)
    schema = episode_schema(obs.shape[1:], actions.shape[1], meta)
    width = int(np.prod(obs.shape[1:]))
    obs_col = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), n, [None, pa.py_buffer(np.ascontiguousarray(obs, np.uint8).tobytes())])
    table = pa.table([
        pa.array(np.full(n, episode, np.int64)), pa.array(np.arange(n, dtype=np.int32)),
        obs_col, _fixed_list(actions, actions.shape[1]),
        pa.array(np.asarray(rewards, np.float32)), pa.array(np.asarray(terminated, bool)),
        pa.array(np.asarray(truncated, bool)),
    ], schema=schema)
    return _write_table(path, table, compression)


def write_series(path: Path, episode: int, mu: np.ndarray, logvar: np.ndarray,
                 actions: np.ndarray, rewards, terminated, truncated, meta: dict) -> int:
    n, latent = mu.shape
    actions = np.asarray(actions, np.float32).reshape(n, -1)
    schema = series_schema(latent, actions.shape[1], meta)
    table = pa.table([
        pa.array(np.full(n, episode, np.int64)), pa.array(np.arange(n, dtype=np.int32)),
        _fixed_list(mu, latent), _fixed_list(logvar, latent),
        _fixed_list(actions, actions.shape[1]), pa.array(np.asarray(rewards, np.float32)),
        pa.array(np.asarray(terminated, bool)), pa.array(np.asarray(truncated, bool)),
    ], schema=schema)
    return _write_table(path, table, "zstd")


def _write_table(path: Path, table: pa.Table, compression: str) -> int:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP, write_page_checksum=True,
                       compression=None if compression == "none" else compression)
    return Path(path).stat().st_size


def _maker(path: Path) -> str:
    """The stage that writes (and replaces damaged) shards here: encode for the latent
    series in data/series/, collect for episodes."""
    return "encode" if Path(path).parent.name == "series" else "collect"


def damaged(path, err: Exception) -> ShardError:
    """A page that fails its checksum, or a cut file: one line naming it and its stage."""
    return ShardError(f"{path}: corrupt or truncated Parquet shard ({err}); "
                      f"re-run `rayworld {_maker(path)}` to replace it")


def open_shard(path) -> pq.ParquetFile:
    """Open a shard and check its schema version; errors name the file."""
    path = Path(path)
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
    except FileNotFoundError:
        raise ShardError(f"{path}: shard listed in the manifest is missing; "
                         f"re-run `rayworld {_maker(path)}` to replace it") from None
    except (pa.ArrowException, OSError) as e:
        raise damaged(path, e) from None
    meta = pf.schema_arrow.metadata or {}
    found = meta.get(VERSION_KEY, b"none").decode()
    if found != str(SCHEMA_VERSION):
        raise ShardError(f"{path}: shard schema version {found} found, expected "
                         f"{SCHEMA_VERSION}; re-collect it with this rayworld version")
    return pf


def obs_array(col: pa.Array, obs_shape) -> np.ndarray:
    """FixedSizeBinary column -> uint8 [N, H, W, C] without a per-row Python loop."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    width = int(np.prod(obs_shape))
    data = np.frombuffer(col.buffers()[1], np.uint8)
    start = col.offset * width
    return data[start:start + len(col) * width].reshape(len(col), *obs_shape)


def list_array(col) -> np.ndarray:
    """FixedSizeList<float32> column -> float32 [N, width]."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    width = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), width)


# ---------------------------------------------------------------- manifest

@dataclass
class Manifest:
    """The completed shards of a data directory, keyed by episode index."""

    root: Path  # the data directory; shard files are relative to it
    info: dict  # what produced the shards: env_id, obs_shape, action_dim, ...
    shards: dict  # episode (int) -> {"file", "steps", "return", "bytes"}
    name: str = "manifest.json"

    @property
    def path(self) -> Path:
        return self.root / self.name

    @classmethod
    def load(cls, root, name: str = "manifest.json", stage: str = "collect") -> Manifest:
        root = Path(root)
        refresh(root / name)  # a run in object storage: the manifest as committed there
        data = read_json(root / name)
        if data is None:
            raise FileNotFoundError(f"{root / name} not found: run `rayworld {stage}` first")
        found = data.get("schema_version")
        if found != SCHEMA_VERSION:
            raise ShardError(f"{root / name}: schema version {found} found, expected "
                             f"{SCHEMA_VERSION}")
        shards = {int(k): v for k, v in data.get("shards", {}).items()}
        return cls(root, data.get("info", {}), shards, name)

    @classmethod
    def load_or_new(cls, root, info: dict, name: str = "manifest.json") -> Manifest:
        root = Path(root)
        if (root / name).exists():
            return cls.load(root, name)
        return cls(root, dict(info), {}, name)

    def save(self):
        atomic_write_json(self.path, {
            "schema_version": SCHEMA_VERSION, "info": self.info,
            "shards": {str(k): v for k, v in sorted(self.shards.items())},
        })

    def file(self, episode: int) -> Path:
        return self.root / self.shards[episode]["file"]

    @property
    def frames(self) -> int:
        return sum(s["steps"] for s in self.shards.values())


class ShardLog:
    """Lists finished shards in a manifest as workers report them, with a progress bar.

    The manifest is saved every few seconds and on close, so a crash loses at most a few seconds
    of listing (and the next run adopts those shards anyway).
    """

    def __init__(self, manifest: Manifest, total: int, desc: str, rate: str):
        self.manifest, self.rate, self.steps = manifest, rate, 0
        self.bar = progress(total, desc)
        self.t0 = self.last_save = time.perf_counter()

    def add(self, entries: list[dict]):
        """Shard entries with their episode: {"episode", "file", "steps", "return", "bytes"}."""
        for entry in entries:
            self.manifest.shards[entry.pop("episode")] = entry
            self.steps += entry["steps"]
        now = time.perf_counter()
        self.bar.update(len(entries))
        self.bar.set_postfix({self.rate: f"{self.steps / (now - self.t0):.0f}"}, refresh=False)
        if now - self.last_save > 5:
            self.manifest.save()
            self.last_save = now

    def close(self):
        self.bar.close()
        self.manifest.save()


def split_episodes(episodes, val_every: int) -> tuple[list[int], list[int]]:
    """Every val_every-th episode is held out; at least one if there are two or more."""
    episodes = sorted(episodes)
    val = [e for e in episodes if e % val_every == val_every - 1]
    if not val and len(episodes) >= 2:
        val = [episodes[-1]]
    train = [e for e in episodes if e not in set(val)]
    return train, val


def rank_share(episodes: list[int], rank: int, world: int) -> list[int]:
    """Distinct episodes per rank: DDP workers never see the same episode in one epoch."""
    return sorted(episodes)[rank::world]


# ---------------------------------------------------------------- streaming

def prefetch(iterable, depth: int = 4):
    """Run a generator in a background thread so reading overlaps compute."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in iterable:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # surface reader errors in the consumer
            q.put(e)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def stream_frames(files: list[Path], obs_shape, batch_size: int, num_batches: int,
                  buffer: int, seed: int):
    """Yield exactly `num_batches` shuffled uint8 batches [B,H,W,C], streaming row groups.

    Files are visited in a seeded random order; frames pass through a shuffle buffer of
    `buffer` frames. If the files run out before `num_batches`, they are visited again.
    """
    rng = np.random.default_rng(seed)
    pool = _Pool(batch_size, rng)
    while pool.emitted < num_batches and files:
        for i in rng.permutation(len(files)):
            pf = open_shard(files[i])
            try:
                for rb in pf.iter_batches(batch_size=ROW_GROUP, columns=["obs"]):
                    pool.add(obs_array(rb.column(0), obs_shape))
                    if pool.held >= buffer:
                        yield from pool.drain(num_batches)
                    if pool.emitted == num_batches:
                        return
            except (pa.ArrowException, OSError) as e:
                raise damaged(files[i], e) from None
        yield from pool.drain(num_batches)  # end of a pass: whole batches only


class _Pool:
    """The shuffle buffer: frames pile up, then leave shuffled in whole batches."""

    def __init__(self, batch_size: int, rng):
        self.batch_size, self.rng = batch_size, rng
        self.parts: list[np.ndarray] = []
        self.held = self.emitted = 0

    def add(self, frames: np.ndarray):
        self.parts.append(frames)
        self.held += len(frames)

    def drain(self, limit: int):
        if not self.held:
            return
        pool = np.concatenate(self.parts)
        self.parts = []
        order = self.rng.permutation(len(pool))
        n_full = min(len(pool) // self.batch_size, limit - self.emitted)
        # each batch gathered on its own: no shuffled copy of the whole pool, and no batch
        # (queued in prefetch) keeps a pool alive, so peak memory does not depend on how
        # drains and queued batches happen to overlap over a long epoch
        rest = pool[order[n_full * self.batch_size:]]
        self.parts, self.held = [rest], len(rest)
        for b in range(n_full):
            self.emitted += 1
            yield pool[order[b * self.batch_size:(b + 1) * self.batch_size]]


def iter_frames(files: list[Path], obs_shape, batch_size: int):
    """Every frame of `files` once, in order, in batches of exactly `batch_size` across file
    boundaries, the last maybe short (validation, encoding, diagnose)."""
    return rebatch(_file_frames(files, obs_shape, batch_size), batch_size)


def _file_frames(files: list[Path], obs_shape, batch_size: int):
    for f in files:
        pf = open_shard(f)
        try:
            for rb in pf.iter_batches(batch_size=batch_size, columns=["obs"]):
                yield obs_array(rb.column(0), obs_shape)
        except (pa.ArrowException, OSError) as e:
            raise damaged(f, e) from None


def rebatch(batches, size: int):
    """The same frames in the same order, in batches of exactly `size` (the last may be
    short). oneDNN keeps kernels and scratch memory per input shape (about 27 MB per shape for
    the VAE), so a batch per episode, each as long as its episode, grows memory with the data."""
    parts, held = [], 0
    for b in batches:
        parts.append(b)
        held += len(b)
        if held >= size:
            pool = parts[0] if len(parts) == 1 else np.concatenate(parts)  # no copy for one
            n = len(pool) // size * size
            yield from (pool[i:i + size] for i in range(0, n, size))
            parts, held = ([pool[n:]], len(pool) - n) if n < len(pool) else ([], 0)
    if held:
        yield parts[0] if len(parts) == 1 else np.concatenate(parts)


def read_series(path) -> dict:
    """One encoded episode as arrays: mu, logvar [T,Z], action [T,A], reward, done [T]."""
    pf = open_shard(path)
    try:
        table = pf.read()
    except (pa.ArrowException, OSError) as e:  # a page that fails its checksum
        raise damaged(path, e) from None
    return {
        "mu": list_array(table.column("mu")), "logvar": list_array(table.column("logvar")),
        "action": list_array(table.column("action")),
        "reward": table.column("reward").to_numpy(),
        "terminated": table.column("terminated").to_numpy(zero_copy_only=False),
    }


def first_latents(path) -> tuple[np.ndarray, np.ndarray]:
    """mu and logvar of an encoded episode's first frame; reads one row group, not the file."""
    pf = open_shard(path)
    try:
        table = pf.read_row_group(0, columns=["mu", "logvar"]).slice(0, 1)
    except (pa.ArrowException, OSError) as e:
        raise damaged(path, e) from None
    return list_array(table.column("mu"))[0], list_array(table.column("logvar"))[0]


STARTS = "series/starts.npz"  # every encoded episode's first latent, in one file


def save_starts(data_dir, vae: str, starts: dict):
    """Write {episode: (mu, logvar)} of the first frames, for the VAE `vae`, in one file: a
    dream or agent actor then reads one file at start-up, not one per episode."""
    eps = sorted(starts)
    with atomic_path(Path(data_dir) / STARTS) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
            np.savez(f, vae=np.array(vae), episodes=np.array(eps, np.int64),
                     mu=np.stack([starts[e][0] for e in eps]).astype(np.float32),
                     logvar=np.stack([starts[e][1] for e in eps]).astype(np.float32))


def load_starts(data_dir, vae: str) -> dict:
    """{episode: (mu, logvar)} saved by `save_starts` for this VAE; {} when there is none, or
    it is another VAE's, or it is unreadable (the series files still hold every latent)."""
    path = Path(data_dir) / STARTS
    refresh(path)
    try:
        with np.load(path) as f:
            eps, mu, logvar = f["episodes"], f["mu"], f["logvar"]
            if str(f["vae"]) != vae or not len(eps) == len(mu) == len(logvar):
                return {}
            return {int(e): (m, v) for e, m, v in zip(eps, mu, logvar)}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return {}


def start_latents(series: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """Every encoded episode's first (mu, logvar), [N, Z] each, in episode order: from the
    starts file, and from the series files only for episodes it lacks (runs encoded before
    it existed)."""
    starts = load_starts(series.root, series.info.get("vae", ""))
    eps = sorted(series.shards)
    pairs = [starts[e] if e in starts else first_latents(series.file(e)) for e in eps]
    return np.stack([m for m, _ in pairs]), np.stack([v for _, v in pairs])


def windows_per_episode(steps: int, seq_len: int, whole: bool = False) -> int:
    """Windows of seq_len cut from an episode; `whole`: consecutive, covering every step."""
    return max(1, -(-steps // seq_len) if whole else steps // seq_len)


def stream_windows(files: list[Path], steps: list[int], seq_len: int, batch_size: int,
                   num_batches: int, group_steps: int, seed: int):
    """Yield `num_batches` batches of latent windows for the MDN-RNN.

    Episodes are read a group at a time (about `group_steps` steps), cut into
    `windows_per_episode` windows of seq_len (+1 for the next-z target) at a random offset,
    and shuffled within the group. Each batch is a dict of float32 arrays:
    mu/logvar [B,T+1,Z], action [B,T,A], reward/done/mask/z_mask [B,T].
    """
    rng = np.random.default_rng(seed)
    emitted = 0
    carry: list[dict] = []
    while emitted < num_batches and files:
        order = rng.permutation(len(files))
        start = 0
        while start < len(order):
            group, total = [], 0
            while start < len(order) and (total < group_steps or not group):
                group.append(order[start])
                total += steps[order[start]]
                start += 1
            windows = carry
            for i in group:
                windows.extend(_cut_windows(read_series(files[i]), seq_len, rng))
            rng.shuffle(windows)
            n_full = len(windows) // batch_size
            for b in range(n_full):
                chunk = windows[b * batch_size:(b + 1) * batch_size]
                yield {k: np.stack([w[k] for w in chunk]) for k in chunk[0]}
                emitted += 1
                if emitted == num_batches:
                    return
            carry = windows[n_full * batch_size:]


def _cut_windows(ep: dict, seq_len: int, rng) -> list[dict]:
    steps = len(ep["reward"])
    n = windows_per_episode(steps, seq_len)
    offset = int(rng.integers(0, steps - n * seq_len + 1)) if steps >= seq_len else 0
    return [episode_window(ep, offset + w * seq_len, seq_len) for w in range(n)]


def episode_window(ep: dict, s: int, seq_len: int) -> dict:
    """Steps [s, s + seq_len) of an episode, zero-padded past its end, with their masks."""
    steps = len(ep["reward"])
    e = min(s + seq_len, steps)
    t = e - s
    pad = seq_len - t
    # Input z_t for t in [s, e); target z_{t+1} exists except after the episode's last step.
    zi = slice(s, min(e + 1, steps))
    z_mask = np.zeros(seq_len, np.float32)
    z_mask[:min(t, steps - 1 - s)] = 1.0
    mask = np.zeros(seq_len, np.float32)
    mask[:t] = 1.0
    return {
        "mu": _pad(ep["mu"][zi], seq_len + 1), "logvar": _pad(ep["logvar"][zi], seq_len + 1),
        "action": _pad(ep["action"][s:e], seq_len),
        "reward": np.pad(ep["reward"][s:e], (0, pad)).astype(np.float32),
        "done": np.pad(ep["terminated"][s:e].astype(np.float32), (0, pad)),
        "mask": mask, "z_mask": z_mask,
    }


def stream_episode_chunks(files: list[Path], seq_len: int, batch_size: int, num_batches: int,
                          seed: int):
    """Yield `num_batches` batches for truncated backprop through whole episodes.

    Each of the batch_size rows is a lane that walks one episode from its first step in
    consecutive windows of seq_len, then takes the next episode of a shuffled order (a new
    order once all are used). `reset` [B] is 1 where a lane starts an episode: the trainer
    zeroes that row's LSTM state and carries every other row's state on, so h late in an
    episode is what the dream and the real agent see there. Other keys as stream_windows.
    """
    rng = np.random.default_rng(seed)
    order: list[int] = []
    lanes: list[list] = [[None, 0] for _ in range(batch_size)]  # [episode arrays, next step]

    def next_episode():
        if not order:
            order.extend(rng.permutation(len(files)).tolist())
        return read_series(files[order.pop()])

    for _ in range(num_batches):
        rows, reset = [], np.zeros(batch_size, np.float32)
        for b, lane in enumerate(lanes):
            if lane[0] is None or lane[1] >= len(lane[0]["reward"]):
                lane[0], lane[1] = next_episode(), 0
                reset[b] = 1.0
            rows.append(episode_window(lane[0], lane[1], seq_len))
            lane[1] += seq_len
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        batch["reset"] = reset
        yield batch


def _pad(a: np.ndarray, length: int) -> np.ndarray:
    a = np.asarray(a, np.float32)
    if len(a) >= length:
        return a[:length]
    return np.concatenate([a, np.zeros((length - len(a),) + a.shape[1:], np.float32)])


# ---------------------------------------------------------------- shared by every data source

EPISODES_DIR = "episodes"


def env_info(cfg) -> dict:
    """What a data directory's shards must agree on, read off a real env."""
    from rayworld.envs import make_env

    env = make_env(cfg.env.id, **cfg.env.kwargs)
    try:
        space = env.action_space
        action_dim = 1 if hasattr(space, "n") else int(np.prod(space.shape))
        return {"env_id": cfg.env.id, "obs_shape": list(env.observation_space.shape),
                "action_dim": action_dim, "discrete": hasattr(space, "n"),
                "action_n": int(getattr(space, "n", 0))}
    finally:
        env.close()


def check_shards(manifest: Manifest, log=print) -> int:
    """Drop manifest entries whose file is missing or unreadable, adopt complete orphans.

    Every page is read with its checksum verified, so a corrupt shard is found here and
    collected again. Returns the number of shards dropped.
    """
    ep_dir = manifest.root / EPISODES_DIR
    ep_dir.mkdir(parents=True, exist_ok=True)
    for tmp in ep_dir.glob(".*.tmp"):  # left by a writer that died mid-file
        tmp.unlink()
    dropped = 0
    listed = {manifest.root / s["file"] for s in manifest.shards.values()}
    for episode in sorted(manifest.shards):
        path = manifest.file(episode)
        try:
            table = open_shard(path).read()
            if table.num_rows != manifest.shards[episode]["steps"]:
                raise ShardError(f"{path}: {table.num_rows} rows, manifest says "
                                 f"{manifest.shards[episode]['steps']}")
        except ShardError as e:
            log(f"replacing shard: {e}")
            path.unlink(missing_ok=True)
            del manifest.shards[episode]
            dropped += 1
    for path in sorted(ep_dir.glob("ep-*.parquet")):
        if path in listed:
            continue
        try:  # finished by an actor, but the driver stopped before listing it
            table = open_shard(path).read(columns=["episode", "reward"])
            episode = int(table.column("episode")[0].as_py())
            if path.name != shard_name(episode):
                raise ShardError(f"{path}: holds episode {episode}")
            manifest.shards[episode] = {
                "file": f"{EPISODES_DIR}/{path.name}", "steps": table.num_rows,
                "return": float(np.sum(table.column("reward").to_numpy())),
                "bytes": path.stat().st_size}
        except (ShardError, IndexError) as e:
            log(f"removing unusable shard: {e}")
            path.unlink(missing_ok=True)
    return dropped


def figures(manifest: Manifest, episodes_new: int, steps_new: int, wall: float,
            steps_per_s: float | None) -> dict:
    """The collect stage's figures for report.json, whatever the source."""
    return {"episodes": len(manifest.shards), "frames_collected": manifest.frames,
            "episodes_new": episodes_new, "env_steps_new": steps_new,
            "env_steps_per_s": steps_per_s,
            "return_mean": float(np.mean([s["return"] for s in manifest.shards.values()])),
            "wall_s": wall}
