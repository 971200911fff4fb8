"""A tiny nuScenes-format dataset that the real nuscenes-devkit loads: tables and small JPEGs.

Each scene drives on a circle at a known constant speed and yaw rate (yaw crosses +-pi in two of
them), so the actions the converter derives can be checked to the digit. CAM_FRONT runs at about
12 Hz with jittered intervals: a keyframe, then five sweeps, and so on, with two sweeps before the
first keyframe (outside the scene's walk) and two after the last. CAM_BACK has keyframes only.

CAM_FRONT frame t of the scene with index s is 160x90: the left half RGB front_color(s, t), the
right half DARK; CAM_BACK frames are all BACK_COLOR.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

# name, speed m/s, yaw rate rad/s, initial yaw; listed out of name order on purpose
SCENES = [("scene-0002", 2.0, -0.2, -3.1), ("scene-0001", 5.0, 0.1, 3.1), ("scene-0003", 8.0, 0.0, 0.5)]
KEYFRAMES = 5
SWEEPS_BETWEEN = 5
SWEEPS_AFTER = 2
SWEEPS_BEFORE = 2
FRAMES = KEYFRAMES + SWEEPS_BETWEEN * (KEYFRAMES - 1) + SWEEPS_AFTER  # per scene, from the first sample
DARK = (20, 20, 20)
BACK_COLOR = (250, 0, 250)
SIZE = (160, 90)


def front_color(scene_index: int, t: int) -> tuple[int, int, int]:
    return (10 + 9 * t, 60 + 70 * scene_index, 200)


def _token(*parts) -> str:
    return hashlib.md5("/".join(map(str, parts)).encode()).hexdigest()


def _quat(yaw: float) -> list[float]:
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


def _pose(speed, rate, yaw0, t_s):
    """Position and yaw after t_s seconds on the circle (a line when rate is 0), from (100, 200)."""
    yaw = yaw0 + rate * t_s
    if rate == 0:
        x, y = speed * t_s * math.cos(yaw0), speed * t_s * math.sin(yaw0)
    else:
        r = speed / rate
        x, y = r * (math.sin(yaw) - math.sin(yaw0)), -r * (math.cos(yaw) - math.cos(yaw0))
    return [100.0 + x, 200.0 + y, 0.0], yaw


def _jpeg(path: Path, left, right=None):
    a = np.empty((SIZE[1], SIZE[0], 3), np.uint8)
    a[:, : SIZE[0] // 2] = left
    a[:, SIZE[0] // 2:] = left if right is None else right
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, quality=95, subsampling=0)


def make_tiny_nuscenes(root: Path, version: str = "v1.0-mini") -> Path:
    root = Path(root)
    tables: dict[str, list] = {name: [] for name in (
        "category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose",
        "log", "scene", "sample", "sample_data", "sample_annotation", "map")}
    tables["category"].append({"token": _token("cat"), "name": "vehicle.car", "description": "car"})
    tables["attribute"].append({"token": _token("attr"), "name": "vehicle.moving", "description": ""})
    tables["visibility"].append({"token": "1", "level": "v0-40", "description": "visibility 0-40%"})
    calib = {}
    for channel in ("CAM_FRONT", "CAM_BACK"):
        sensor = _token("sensor", channel)
        tables["sensor"].append({"token": sensor, "channel": channel, "modality": "camera"})
        calib[channel] = _token("calib", channel)
        tables["calibrated_sensor"].append({
            "token": calib[channel], "sensor_token": sensor, "translation": [1.7, 0.0, 1.5],
            "rotation": [0.5, -0.5, 0.5, -0.5],
            "camera_intrinsic": [[100.0, 0.0, 80.0], [0.0, 100.0, 45.0], [0.0, 0.0, 1.0]]})
    log = _token("log")
    tables["log"].append({"token": log, "logfile": "tiny-log", "vehicle": "n000",
                          "date_captured": "2018-07-24", "location": "singapore-onenorth"})
    tables["map"].append({"token": _token("map"), "log_tokens": [log], "category": "semantic_prior",
                          "filename": "maps/tiny.png"})
    (root / "maps").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "maps" / "tiny.png")

    for scene in SCENES:
        _add_scene(tables, root, log, calib, *scene)

    table_dir = root / version
    table_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        (table_dir / f"{name}.json").write_text(json.dumps(rows, indent=0))
    return root


def _add_scene(tables: dict, root: Path, log: str, calib: dict, name: str, speed: float, rate: float,
               yaw0: float):
    s = int(name[-1]) - 1  # scene index in name order
    scene = _token("scene", name)
    t0 = 1_532_402_927_000_000 + s * 100_000_000
    # CAM_FRONT times: jittered ~12 Hz; index SWEEPS_BEFORE is the first keyframe
    n = SWEEPS_BEFORE + FRAMES
    stamps = [t0]
    for k in range(1, n):
        stamps.append(stamps[-1] + 83_333 + (k % 3 - 1) * 4_000)
    key_idx = [SWEEPS_BEFORE + k * (SWEEPS_BETWEEN + 1) for k in range(KEYFRAMES)]
    samples = [_token("sample", name, k) for k in range(KEYFRAMES)]
    for k, tok in enumerate(samples):
        tables["sample"].append({
            "token": tok, "timestamp": stamps[key_idx[k]], "scene_token": scene,
            "prev": samples[k - 1] if k else "", "next": samples[k + 1] if k + 1 < KEYFRAMES else ""})
    tables["scene"].append({
        "token": scene, "log_token": log, "nbr_samples": KEYFRAMES, "first_sample_token": samples[0],
        "last_sample_token": samples[-1], "name": name, "description": f"tiny {name}"})

    def add_frame(channel, i, stamp, is_key, sample, prev, nxt, left, right=None):
        tok = _token("sd", name, channel, i)
        pose_tok = _token("pose", name, channel, i)
        translation, yaw = _pose(speed, rate, yaw0, (stamp - t0) / 1e6)
        tables["ego_pose"].append({"token": pose_tok, "timestamp": stamp,
                                   "rotation": _quat(yaw), "translation": translation})
        folder = "samples" if is_key else "sweeps"
        filename = f"{folder}/{channel}/{name}__{channel}__{stamp}.jpg"
        _jpeg(root / filename, left, right)
        tables["sample_data"].append({
            "token": tok, "sample_token": sample, "ego_pose_token": pose_tok,
            "calibrated_sensor_token": calib[channel], "timestamp": stamp, "fileformat": "jpg",
            "is_key_frame": is_key, "height": SIZE[1], "width": SIZE[0], "filename": filename,
            "prev": _token("sd", name, channel, prev) if prev is not None else "",
            "next": _token("sd", name, channel, nxt) if nxt is not None else ""})

    for i, stamp in enumerate(stamps):
        is_key = i in key_idx
        # a sweep belongs to the next keyframe's sample (the last one's after the scene ends)
        k = min(sum(1 for j in key_idx if j < i), KEYFRAMES - 1) if not is_key else key_idx.index(i)
        t = i - SWEEPS_BEFORE
        add_frame("CAM_FRONT", i, stamp, is_key, samples[k], i - 1 if i else None,
                  i + 1 if i + 1 < n else None, front_color(s, t) if t >= 0 else (0, 255, 0), DARK)
    for k, i in enumerate(key_idx):
        add_frame("CAM_BACK", i, stamps[i] + 20_000, True, samples[k], key_idx[k - 1] if k else None,
                  key_idx[k + 1] if k + 1 < KEYFRAMES else None, BACK_COLOR)


def expected_actions(scene_name: str) -> tuple[float, float]:
    """(speed m/s, yaw rate rad/s) every action of this scene should hold."""
    for name, speed, rate, _ in SCENES:
        if name == scene_name:
            return speed, rate
    raise KeyError(scene_name)
