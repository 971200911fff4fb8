"""Pre-collected sequence datasets (HDF5, NPZ, torch .pt) -> rollout shards.

`source.path` is one file or a directory (searched recursively, files in natural name order) of
.h5/.hdf5, .npz or .pt/.pth files. A file is read as a tree of named arrays: HDF5 datasets by
their path ("episode_3/observations"), NPZ keys as saved (a "/" in a key nests it), a .pt file's
nested dicts (lists count as "0", "1", ...). torch files are read with weights_only=True, so
loading one runs no code; other pickles are refused.

Every place in the tree that holds an observation array is read as episodes, with its sibling
arrays (first name found wins; `source.keys` sets the name, e.g. {obs: pixels}):
    obs         observations, observation, obs, image, images, pixels    required
    action      actions, action                                          required
    reward      rewards, reward                                          required
    terminated  terminals, terminal, terminated, dones, done, is_terminal
    truncated   timeouts, timeout, truncated, is_last
An array is cut into episodes after every step flagged terminated or truncated (D4RL style);
the steps after the last flag are an episode too. So one group per episode and one flat buffer
of many episodes both work. Every episode's last step is terminated (if so flagged) or
truncated (the data stops there).

Layouts: obs [T,H,W,C] or [T,C,H,W] with C 1 or 3, or [T,H,W] (grayscale); uint8, integers in
0..255, or floats in [0, 1]; resized (box filter, whole frame) to 64x64 RGB. One extra final
observation (T+1 of them) is dropped. action [T,A] floats (continuous), or integers [T] / [T,1]
(discrete: action_n is max+1, or a file attribute / scalar named action_n if larger).
reward [T] or [T,1]. Row t of a shard is (obs_t, the action taken at obs_t, the reward after it).

One Ray task per file scans it (episode bounds, shapes; no frames read), then one task per
episode (HDF5) or per file (NPZ, .pt: their arrays are read whole) converts and writes.
"""

from __future__ import annotations

import contextlib
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np

from rayworld.envs.frames import resize64
from rayworld.sources.common import OBS_SIZE, SourceError, shard_entry, source_info

SUFFIXES = {".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5", ".pt": "torch", ".pth": "torch"}
NAMES = {
    "obs": ("observations", "observation", "obs", "image", "images", "pixels"),
    "action": ("actions", "action"),
    "reward": ("rewards", "reward"),
    "terminated": ("terminals", "terminal", "terminated", "dones", "done", "is_terminal"),
    "truncated": ("timeouts", "timeout", "truncated", "is_last"),
}
REQUIRED = ("obs", "action", "reward")


def natural_key(text: str):
    """'ep_10' after 'ep_9'."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def list_files(path: Path) -> list[Path]:
    accepted = ", ".join(SUFFIXES)
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise SourceError(f"{path}: not a dataset file this importer reads; expected {accepted}"
                              + (" (pickles can run code when loaded: save the arrays with "
                                 "numpy.savez or torch.save)" if path.suffix in (".pkl", ".pickle") else ""))
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"source.path {path}: no such file or directory")
    files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES]
    if not files:
        raise SourceError(f"source.path {path}: no dataset files under it; expected {accepted}")
    return sorted(files, key=lambda p: natural_key(str(p.relative_to(path))))


def key_names(keys: dict) -> dict:
    """Our name -> the candidate names in the file; `source.keys` replaces the defaults."""
    for ours, theirs in keys.items():
        if ours not in NAMES:
            raise SourceError(f"source.keys: unknown name {ours!r}; expected some of {', '.join(NAMES)}")
        if not isinstance(theirs, str) or not theirs:
            raise SourceError(f"source.keys.{ours}: got {theirs!r}, expected the array's name in the file")
    return {ours: (keys[ours],) if ours in keys else names for ours, names in NAMES.items()}


# ---------------------------------------------------------------- reading files

class NpzArray:
    """One array of an .npz: shape and dtype from its header; the data is read on first use."""

    def __init__(self, npz, key: str, path: Path):
        self.npz, self.key, self.path, self._data = npz, key, path, None
        with npz.zip.open(key + ".npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            self.shape, _, self.dtype = read(f)

    def __getitem__(self, index):
        if self._data is None:
            try:
                self._data = self.npz[self.key]
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise SourceError(f"{self.path}: array '{self.key}' cannot be read ({first}); "
                                  "expected an undamaged .npz") from None
        return self._data[index]


@contextlib.contextmanager
def open_arrays(path: Path):
    """Yield (arrays, attrs): array name -> array-like (.shape, .dtype, slicing), scalars."""
    kind = SUFFIXES[path.suffix.lower()]
    if kind == "hdf5":
        try:
            import h5py
        except ImportError:
            raise ImportError("HDF5 datasets need h5py: pip install 'rayworld[offline]'") from None
    try:
        if kind == "hdf5":
            handle = h5py.File(path, "r")
        elif kind == "npz":
            handle = np.load(path, allow_pickle=False)
        else:
            import torch

            handle = contextlib.nullcontext()
            tree = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # each library has its own errors for a file it cannot parse
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SourceError(f"{path}: cannot read it as {kind} ({first})") from None
    with handle:
        arrays: dict = {}
        attrs: dict = {}
        if kind == "hdf5":
            handle.visititems(lambda name, obj: arrays.__setitem__(name, obj)
                              if isinstance(obj, h5py.Dataset) else None)
            attrs.update({k: v for k, v in handle.attrs.items() if np.ndim(v) == 0})
        elif kind == "npz":
            arrays = {k: NpzArray(handle, k, path) for k in handle.files}
        else:
            _flatten(tree, "", arrays, attrs)
        for k in [k for k, a in arrays.items() if len(a.shape) == 0]:
            attrs[k] = arrays.pop(k)[()]
        yield arrays, attrs


def _flatten(obj, prefix: str, arrays: dict, attrs: dict):
    import torch

    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}/", arrays, attrs)
    elif isinstance(obj, (list, tuple)) and obj and not isinstance(obj[0], (int, float, bool)):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}{i}/", arrays, attrs)
    else:
        arrays[prefix.rstrip("/")] = obj.numpy() if isinstance(obj, torch.Tensor) else np.asarray(obj)


# ---------------------------------------------------------------- scanning

def find(arrays: dict, prefix: str, ours: str, names: dict, label: str, required: bool = True):
    """The full name of our array `ours` under `prefix`, or None when optional and absent."""
    for name in names[ours]:
        if prefix + name in arrays:
            return prefix + name
    if required:
        raise SourceError(f"{label}: no {ours} array under '{prefix or '/'}'; expected one of "
                          f"{', '.join(names[ours])} (set source.keys.{ours} to its name)")
    return None


def obs_layout(shape, name: str, label: str) -> str:
    if len(shape) == 3:
        return "gray"
    if len(shape) == 4 and shape[-1] in (1, 3):
        return "hwc"
    if len(shape) == 4 and shape[1] in (1, 3):
        return "chw"
    raise SourceError(f"{label}: '{name}' has shape {list(shape)}; expected [T,H,W,C] or [T,C,H,W] "
                      "with 1 or 3 channels, or [T,H,W]")


def flags(arrays: dict, name: str | None, steps: int, label: str) -> np.ndarray:
    if name is None:
        return np.zeros(steps, bool)
    a = arrays[name]
    if tuple(a.shape) not in ((steps,), (steps, 1)):
        raise SourceError(f"{label}: '{name}' has shape {list(a.shape)}; expected [{steps}] like the "
                          "actions")
    return np.asarray(a[:], bool).reshape(steps)


def scan_file(path: str, rel: str, keys: dict) -> list[dict]:
    """One Ray task: every episode in one file, as specs for `convert_file`; reads no frames."""
    path = Path(path)
    names = key_names(keys)
    specs = []
    with open_arrays(path) as (arrays, attrs):
        prefixes: dict[str, tuple[int, str]] = {}  # where episodes live -> (name rank, obs name)
        for full in arrays:
            for rank, name in enumerate(names["obs"]):
                if full == name or full.endswith("/" + name):
                    prefix = full[: len(full) - len(name)]
                    if prefix not in prefixes or rank < prefixes[prefix][0]:
                        prefixes[prefix] = (rank, full)
        if not prefixes:
            raise SourceError(f"{path}: no observation array; expected one named "
                              f"{', '.join(names['obs'])} (set source.keys.obs to its name)")
        for prefix in sorted(prefixes, key=natural_key):
            specs += _scan_group(path, rel, arrays, attrs, prefix, prefixes[prefix][1], names)
    return specs


def _scan_group(path, rel, arrays, attrs, prefix, obs_name, names) -> list[dict]:
    label = str(path)
    cols = {ours: find(arrays, prefix, ours, names, label, ours in REQUIRED) for ours in NAMES}
    cols["obs"] = obs_name
    obs_shape, act = tuple(arrays[obs_name].shape), arrays[cols["action"]]
    layout = obs_layout(obs_shape, obs_name, label)
    steps = act.shape[0] if len(act.shape) else 0
    if obs_shape[0] not in (steps, steps + 1) or steps == 0:
        raise SourceError(f"{label}: '{cols['action']}' has {steps} steps, '{obs_name}' has "
                          f"{obs_shape[0]}; expected as many observations as actions (or one more)")
    discrete = np.issubdtype(act.dtype, np.integer) and (len(act.shape) == 1 or act.shape[1:] == (1,))
    if len(act.shape) > 2 or not (discrete or np.issubdtype(act.dtype, np.floating)):
        raise SourceError(f"{label}: '{cols['action']}' has shape {list(act.shape)} and dtype {act.dtype}; "
                          "expected floats [T,A] or [T], or integers [T] (discrete)")
    rew = arrays[cols["reward"]]
    if tuple(rew.shape) not in ((steps,), (steps, 1)):
        raise SourceError(f"{label}: '{cols['reward']}' has shape {list(rew.shape)}; expected "
                          f"[{steps}] like '{cols['action']}'")
    term = flags(arrays, cols["terminated"], steps, label)
    ends = np.flatnonzero(term | flags(arrays, cols["truncated"], steps, label)) + 1
    bounds = [0] + [int(e) for e in ends if e < steps] + [steps]
    action_n = int(attrs.get("action_n", 0)) if discrete else 0
    base = rel + (f":{prefix.rstrip('/')}" if prefix else "")
    specs = []
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        spec = {"name": base + (f"#{k}" if len(bounds) > 2 else ""), "file": str(path),
                "start": lo, "stop": hi, "cols": cols, "layout": layout,
                "action_dim": 1 if discrete or len(act.shape) == 1 else int(act.shape[1]),
                "discrete": bool(discrete), "action_n": action_n}
        if discrete:
            values = np.asarray(act[lo:hi]).reshape(-1)
            if values.min() < 0:
                raise SourceError(f"{label}: '{cols['action']}' holds {values.min()}; expected "
                                  "discrete actions 0..n-1")
            spec["action_n"] = max(action_n, int(values.max()) + 1)
        specs.append(spec)
    return specs


# ---------------------------------------------------------------- converting

def to_frames(x: np.ndarray, layout: str, label: str) -> np.ndarray:
    """Observations in any accepted layout -> uint8 [T, 64, 64, 3]."""
    if layout == "chw":
        x = x.transpose(0, 2, 3, 1)
    elif layout == "gray":
        x = x[..., None]
    if x.dtype != np.uint8:
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if np.issubdtype(x.dtype, np.integer) and 0 <= lo and hi <= 255:
            x = x.astype(np.uint8)
        elif np.issubdtype(x.dtype, np.floating) and 0 <= lo and hi <= 1:
            x = np.round(x.astype(np.float32) * 255).astype(np.uint8)
        else:
            raise SourceError(f"{label}: {x.dtype} values in [{lo:g}, {hi:g}]; expected uint8, "
                              "integers in 0..255 or floats in [0, 1]")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (OBS_SIZE, OBS_SIZE):
        x = np.stack([resize64(f) for f in x])
    return np.ascontiguousarray(x)


def convert_file(specs: list[dict], episodes: list[int], out_dir: str, meta: dict,
                 compression: str) -> list[dict]:
    """One Ray task: these episodes of one file -> one shard each."""
    from rayworld.data import shard_name, write_episode

    path = Path(specs[0]["file"])
    out = []
    with open_arrays(path) as (arrays, _):
        for spec, episode in zip(specs, episodes):
            lo, hi, cols = spec["start"], spec["stop"], spec["cols"]
            n = hi - lo
            label = f"{path} '{cols['obs']}' steps {lo}..{hi - 1}"
            obs = to_frames(np.asarray(arrays[cols["obs"]][lo:hi]), spec["layout"], label)
            actions = np.asarray(arrays[cols["action"]][lo:hi], np.float32).reshape(n, -1)
            rewards = np.asarray(arrays[cols["reward"]][lo:hi], np.float32).reshape(n)
            term = np.zeros(n, bool) if cols["terminated"] is None else \
                np.asarray(arrays[cols["terminated"]][lo:hi], bool).reshape(n)
            if not (np.isfinite(actions).all() and np.isfinite(rewards).all()):
                raise SourceError(f"{path}: '{cols['action']}' or '{cols['reward']}' holds NaN or "
                                  f"inf in steps {lo}..{hi - 1}; expected finite values")
            trunc = np.zeros(n, bool)
            trunc[-1] = not term[-1]
            size = write_episode(Path(out_dir) / shard_name(episode), episode, obs, actions, rewards,
                                 term, trunc, meta={**meta, "episode": episode, "name": spec["name"]},
                                 compression=compression)
            out.append(shard_entry(Path(out_dir), episode, n, rewards.sum(), size))
    return out


def prepare(cfg, log=print):
    """Scan every file in Ray tasks; returns (manifest info, submit)."""
    import ray

    from rayworld.sources.common import gather

    s = cfg.source
    root = Path(s.path).expanduser().resolve()
    key_names(s.keys)  # a bad source.keys fails here, before any task starts
    files = list_files(root)
    base = root if root.is_dir() else root.parent
    scan = ray.remote(num_cpus=1)(scan_file)
    found = gather([scan.remote(str(f), str(f.relative_to(base)), s.keys) for f in files],
                   len(files), "scan")
    specs = [spec for per_file in found for spec in per_file]
    first = specs[0]
    for spec in specs:
        if (spec["discrete"], spec["action_dim"]) != (first["discrete"], first["action_dim"]):
            kind = lambda sp: "discrete" if sp["discrete"] else f"{sp['action_dim']}-dim continuous"
            raise SourceError(f"{spec['file']}: episode {spec['name']} has {kind(spec)} actions, "
                              f"{first['name']} has {kind(first)}; expected one action space")
    info = source_info(cfg, first["action_dim"], first["discrete"], max(sp["action_n"] for sp in specs),
                       {"keys": dict(s.keys), "episodes": [sp["name"] for sp in specs]})
    log(f"offline {root}: {len(files)} files, {len(specs)} episodes, "
        f"{sum(sp['stop'] - sp['start'] for sp in specs)} steps")
    task = ray.remote(num_cpus=1)(convert_file)
    meta = {"env_id": info["env_id"], "source": "offline"}

    def submit(todo, out_dir):
        groups: dict = {}  # one task per episode for HDF5 (sliced reads), per file otherwise
        for e in todo:
            spec = specs[e]
            whole = SUFFIXES[Path(spec["file"]).suffix.lower()] != "hdf5"
            groups.setdefault((spec["file"], None if whole else e), []).append(e)
        return [task.remote([specs[e] for e in eps], eps, str(out_dir), meta, cfg.data.compression)
                for eps in groups.values()]

    return info, submit
