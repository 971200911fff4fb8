"""The environments: gymnasium's own checker, determinism, reward and episode ends."""

import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs import MissingExtraError, UnknownEnvError, known_env_ids, make_env


@pytest.mark.parametrize("env_id", ["rayworld/SimpleDriving-v0", "rayworld/CarRacing-v0",
                                    "rayworld/Breakout-v0"])
def test_check_env_passes(env_id):
    env = make_env(env_id)
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=3)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    env.close()


def test_registered_with_gymnasium():
    env = gym.make("rayworld/SimpleDriving-v0", max_steps=5)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (64, 64, 3)
    envs.register_all()  # idempotent


def _rollout(seed, actions):
    env = make_env("rayworld/SimpleDriving-v0")
    obs, _ = env.reset(seed=seed)
    frames, rewards = [obs], []
    for a in actions:
        obs, r, term, trunc, _ = env.step(a)
        frames.append(obs)
        rewards.append(r)
        if term or trunc:
            break
    return np.stack(frames), np.array(rewards)


def test_simple_driving_is_deterministic_per_seed():
    actions = np.random.default_rng(0).uniform([-1, 0, 0], [1, 1, 1], (100, 3)).astype(np.float32)
    f1, r1 = _rollout(7, actions)
    f2, r2 = _rollout(7, actions)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(r1, r2)
    f3, _ = _rollout(8, actions)
    assert not np.array_equal(f1[0], f3[0])  # another seed, another track


def _follow_track(env, steps):
    """A simple steering law on the env's own track geometry: drive along the centreline."""
    total, info = 0.0, {}
    for _ in range(steps):
        steer = float(np.clip(-0.15 * info.get("lateral", 0.0), -1, 1))
        _, r, term, trunc, info = env.step(np.array([steer, 0.3, 0.0], np.float32))
        total += r
        if term or trunc:
            break
    return total, info, term


def test_driving_along_the_road_earns_progress():
    env = make_env("rayworld/SimpleDriving-v0")
    env.reset(seed=1)
    total, info, term = _follow_track(env, 200)
    assert info["progress"] > 0.02 and total > 0
    assert not term


def test_leaving_the_road_terminates():
    env = make_env("rayworld/SimpleDriving-v0")
    env.reset(seed=1)
    steps = 0
    for steps in range(1, 501):  # noqa: B007 (read after the loop)
        _, _, term, trunc, info = env.step(np.array([1.0, 1.0, 0.0], np.float32))
        if term or trunc:
            break
    assert term and info["off_track"] and steps < 500


def test_time_limit_truncates():
    env = make_env("rayworld/SimpleDriving-v0", max_steps=25)
    env.reset(seed=0)
    ends = []
    for _ in range(25):
        _, _, term, trunc, _ = env.step(np.array([0, 0, 1], np.float32))  # parked: never off
        ends.append((term, trunc))
    assert ends[-1] == (False, True) and not any(t or u for t, u in ends[:-1])


def test_unknown_id_lists_known_ids():
    with pytest.raises(UnknownEnvError) as e:
        make_env("rayworld/Nope-v0")
    for env_id in known_env_ids():
        assert env_id in str(e.value)


def test_missing_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ale_py", None)  # as if ale-py were not installed
    with pytest.raises(MissingExtraError, match=r"'atari' extra: pip install 'rayworld\[atari\]'"):
        make_env("rayworld/Breakout-v0")


def test_carracing_crop_and_resize():
    from envs.carracing import to_64

    frame = np.zeros((96, 96, 3), np.uint8)
    frame[84:] = 255  # the dashboard rows must not show up
    out = to_64(frame)
    assert out.shape == (64, 64, 3) and out.max() == 0
