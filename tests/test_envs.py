"""The environments: gymnasium's own checker, determinism, reward and episode ends."""

import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import rayworld.envs as envs
from rayworld.envs import MissingExtraError, UnknownEnvError, known_env_ids, make_env


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
    from rayworld.envs.carracing import to_64

    frame = np.zeros((96, 96, 3), np.uint8)
    frame[84:] = 255  # the dashboard rows must not show up
    out = to_64(frame)
    assert out.shape == (64, 64, 3) and out.max() == 0


# ---- SimpleDriving details: reward scale, pixels, pickling, lazy imports ----


def test_simple_driving_check_env_with_render_no_warnings():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # via gymnasium.make so the env has a spec: check_env then also tries other render modes
        env = gym.make("rayworld/SimpleDriving-v0", render_mode="rgb_array").unwrapped
        check_env(env)
    assert [str(w.message) for w in caught] == []
    assert np.array_equal(env.render(), env.step(env.action_space.sample())[0])


def test_simple_driving_seed_picks_the_track():
    env = envs.SimpleDrivingEnv()
    env.reset(seed=1)
    t1 = env.centreline
    env.reset(seed=2)
    assert t1.shape != env.centreline.shape or not np.allclose(t1, env.centreline)
    env.reset(seed=1)
    np.testing.assert_array_equal(env.centreline, t1)


def test_a_lap_is_worth_100():
    env = envs.SimpleDrivingEnv()
    _, info = env.reset(seed=5)
    total, steps = 0.0, 0
    while info["progress"] < 1.0:  # steer on the heading error and lateral offset
        steer = np.clip(-2.0 * info["heading_error"] - 0.1 * info["lateral"], -1, 1)
        _, r, term, trunc, info = env.step(np.array([steer, 0.5, 0.0], np.float32))
        total, steps = total + r, steps + 1
        assert not (term or trunc)
    assert total == pytest.approx(100 * info["progress"] - 0.01 * steps, abs=1e-6)
    assert 600 < steps < 1000  # ~1,700-unit lap at speed ~2 units/step


def test_driving_backwards_is_negative():
    env = envs.SimpleDrivingEnv(step_cost=0.0)
    env.reset(seed=6)
    env._heading += np.pi  # no reverse gear: turn the car around in place
    rewards = [env.step(np.array([0.0, 1.0, 0.0], np.float32))[1] for _ in range(20)]
    assert sum(rewards) < -0.5 and max(rewards) <= 1e-9


def test_speed_is_visible_in_pixels():
    env = envs.SimpleDrivingEnv()
    still, _ = env.reset(seed=0)
    for _ in range(30):
        moving, *_ = env.step(np.array([0.0, 1.0, 0.0], np.float32))
    assert still[61:63].max() == 0  # parked: empty speed bar
    assert (moving[61:63] == 255).all(-1).sum() > 20  # moving: white bar
    assert (moving[45:52, 30:34] == [204, 0, 0]).all(-1).sum() > 20  # the red car


def test_simple_driving_pickles_small_and_resumes_identically():
    import pickle

    env = envs.SimpleDrivingEnv()
    env.reset(seed=8)
    env.step(np.array([0.0, 1.0, 0.0], np.float32))
    data = pickle.dumps(env)
    assert len(data) < 1_000_000  # the raster and view tables are rebuilt, not shipped
    clone = pickle.loads(data)
    for _ in range(20):
        a, b = (e.step(np.array([0.2, 1.0, 0.0], np.float32)) for e in (env, clone))
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1:4] == b[1:4]


def test_import_rayworld_registers_the_envs_without_optional_modules():
    import subprocess

    code = ("import sys; sys.modules['ale_py'] = None\n"
            "import rayworld, gymnasium\n"
            "assert 'Box2D' not in sys.modules and 'torch' not in sys.modules\n"
            "print(gymnasium.make('rayworld/SimpleDriving-v0').reset(seed=0)[0].shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(64, 64, 3)"
