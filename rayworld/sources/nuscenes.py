"""nuScenes scenes -> rollout shards, read with the nuscenes-devkit; one Ray task per scene.

One scene is one episode (scenes in name order: scene-0061 is episode 0 of v1.0-mini).

obs: the frames of one camera (`source.camera`, CAM_FRONT by default) in time order, found by
    walking that camera's sample_data chain (`next`) from the scene's first sample to the end
    of the scene: every ~12 Hz frame (keyframes and sweeps), or the 2 Hz keyframes only with
    `source.keyframes_only`. Each JPEG is box-resized as a whole to 64x64 (no crop): all of the
    field of view is kept, squashed horizontally (1600x900 -> 64x64). libjpeg first decodes it
    at 1/4 scale (400x225; about 6x faster, within 2 grey levels on average of a full decode).
action_t = [speed, yaw_rate], the ego motion from frame t to frame t+1, from their ego poses
    (global frame, one pose per camera frame):
        dt       = (timestamp_{t+1} - timestamp_t) / 1e6        seconds (timestamps are in us)
        speed    = |(x, y)_{t+1} - (x, y)_t| / dt               m/s, planar, >= 0
        yaw_rate = wrap(yaw_{t+1} - yaw_t) / dt                 rad/s, > 0 turning left
    yaw is the heading about the global z axis of the pose quaternion (pyquaternion's
    yaw_pitch_roll), wrap maps to [-pi, pi). The last frame repeats the previous action.
reward 0; terminated False; truncated True on the last frame (the log ends, the world does not).

The driver loads the tables once and hands each task its scene's frame list (file, timestamp,
pose); the tasks decode, resize and write. Tasks never load the tables (v1.0-trainval's take
GBs of memory and a minute to load).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rayworld.envs.frames import resize64
from rayworld.sources.common import OBS_SIZE, SourceError, shard_entry, source_info

ACTIONS = ["speed_m_per_s", "yaw_rate_rad_per_s"]


def load_nuscenes(dataroot: Path, version: str):
    try:
        from nuscenes.nuscenes import NuScenes
    except ImportError:
        raise ImportError("source.kind 'nuscenes' needs the nuscenes-devkit: "
                          "pip install 'rayworld[nuscenes]'") from None
    if not (dataroot / version).is_dir():
        raise FileNotFoundError(f"{dataroot / version} not found: expected the nuScenes tables "
                                f"(scene.json, sample_data.json, ...) of source.version {version!r} "
                                f"under source.path {dataroot}")
    try:
        return NuScenes(version=version, dataroot=str(dataroot), verbose=False)
    except (AssertionError, KeyError, OSError, ValueError) as e:
        raise SourceError(f"{dataroot / version}: the nuscenes-devkit cannot load these tables "
                          f"({type(e).__name__}: {e})") from None


def scene_frames(nusc, scene: dict, camera: str, keyframes_only: bool) -> dict:
    """The camera's frames of one scene, in time order: image files, timestamps, ego poses."""
    first = nusc.get("sample", scene["first_sample_token"])
    if camera not in first["data"]:
        raise SourceError(f"scene {scene['name']}: no {camera} frame in its first sample; "
                          f"it has {', '.join(sorted(first['data']))}")
    frames: dict = {"files": [], "timestamps": [], "translations": [], "rotations": []}
    token = first["data"][camera]
    while token:
        sd = nusc.get("sample_data", token)
        if sd["is_key_frame"] or not keyframes_only:
            pose = nusc.get("ego_pose", sd["ego_pose_token"])
            frames["files"].append(sd["filename"])
            frames["timestamps"].append(int(pose["timestamp"]))
            frames["translations"].append([float(v) for v in pose["translation"]])
            frames["rotations"].append([float(v) for v in pose["rotation"]])
        token = sd["next"]
    return frames


def pose_actions(timestamps_us, translations, rotations, where: str = "") -> np.ndarray:
    """[speed m/s, yaw rate rad/s] from each ego pose to the next; float32 [T, 2].

    Rotations are nuScenes' [w, x, y, z] quaternions; the yaw is the first of their z-y'-x''
    angles, as the devkit's pyquaternion gives it.
    """
    t = np.asarray(timestamps_us, np.int64)
    if len(t) < 2:
        return np.zeros((len(t), 2), np.float32)
    dt = np.diff(t) / 1e6
    if (dt <= 0).any():
        i = int(np.argmax(dt <= 0))
        raise SourceError(f"{where}: ego pose timestamps {t[i]} then {t[i + 1]} at frames {i}, "
                          f"{i + 1}; expected them to increase")
    xy = np.asarray(translations, np.float64)[:, :2]
    w, x, y, z = np.asarray(rotations, np.float64).T
    yaw = np.arctan2(2 * (w * z - x * y), 1 - 2 * (y * y + z * z))
    speed = np.linalg.norm(np.diff(xy, axis=0), axis=1) / dt
    dyaw = (np.diff(yaw) + np.pi) % (2 * np.pi) - np.pi
    actions = np.stack([speed, dyaw / dt], axis=1)
    return np.concatenate([actions, actions[-1:]]).astype(np.float32)


def load_frame(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.draft("RGB", (2 * OBS_SIZE, 2 * OBS_SIZE))  # JPEG: decode at 1/2..1/8 scale, far faster
            return resize64(img)
    except OSError as e:  # missing, truncated or not an image
        why = "no such file" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
        raise SourceError(f"{path}: cannot read this camera frame ({why}); expected a JPEG") from None


def convert_scene(episode: int, scene: str, frames: dict, dataroot: str, out_dir: str,
                  meta: dict, compression: str) -> list[dict]:
    """One Ray task: a scene's frames -> one shard."""
    from rayworld.data import shard_name, write_episode

    obs = np.stack([load_frame(Path(dataroot) / f) for f in frames["files"]])
    actions = pose_actions(frames["timestamps"], frames["translations"], frames["rotations"],
                           where=f"scene {scene}")
    n = len(obs)
    truncated = np.zeros(n, bool)
    truncated[-1] = True
    size = write_episode(Path(out_dir) / shard_name(episode), episode, obs, actions,
                         np.zeros(n, np.float32), np.zeros(n, bool), truncated,
                         meta={**meta, "episode": episode, "scene": scene}, compression=compression)
    return [shard_entry(Path(out_dir), episode, n, 0.0, size)]


def prepare(cfg, log=print):
    """Load the tables, list each scene's frames; returns (manifest info, submit)."""
    import ray

    s = cfg.source
    root = Path(s.path).expanduser().resolve()
    nusc = load_nuscenes(root, s.version)
    channels = sorted({r["channel"] for r in nusc.sensor if r["modality"] == "camera"})
    if s.camera not in channels:
        raise SourceError(f"source.camera {s.camera!r}: not a camera of {root / s.version}; "
                          f"expected one of {', '.join(channels)}")
    scenes = sorted(nusc.scene, key=lambda r: r["name"])
    if not scenes:
        raise SourceError(f"{root / s.version}/scene.json: no scenes")
    plans = [scene_frames(nusc, scene, s.camera, s.keyframes_only) for scene in scenes]
    info = source_info(cfg, 2, False, 0, {"version": s.version, "camera": s.camera,
                                          "keyframes_only": s.keyframes_only,
                                          "episodes": [r["name"] for r in scenes]}, actions=ACTIONS)
    log(f"nuscenes {s.version}: {len(scenes)} scenes, {sum(len(p['files']) for p in plans)} "
        f"{s.camera} frames")
    task = ray.remote(num_cpus=1)(convert_scene)
    meta = {"env_id": info["env_id"], "source": "nuscenes", "camera": s.camera}

    def submit(todo, out_dir):
        return [task.remote(e, scenes[e]["name"], plans[e], str(root), str(out_dir), meta,
                            cfg.data.compression) for e in todo]

    return info, submit
