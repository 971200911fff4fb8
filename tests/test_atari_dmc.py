"""Atari (discrete actions end to end) and DeepMind Control from pixels, on the real envs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rayworld.cli import main
from rayworld.data import Manifest, list_array, open_shard
from rayworld.models.mdn import MDNRNN

ROOT = Path(__file__).resolve().parents[1]


def test_mdn_takes_discrete_actions_one_hot():
    torch.manual_seed(0)
    m = MDNRNN(latent=5, action_dim=1, hidden=8, mixtures=2, action_n=4)
    assert m.lstm.input_size == 5 + 4
    z = torch.randn(3, 7, 5)
    idx = torch.randint(4, (3, 7, 1)).float()  # as the shards hold them
    out, _ = m(z, idx)
    # the same LSTM fed the one-hot vectors by hand
    one_hot = torch.nn.functional.one_hot(idx.squeeze(-1).long(), 4).float()
    h, _ = m.lstm(torch.cat([z, one_hot], -1))
    assert torch.allclose(out.h, h)
    # a step takes the index too, and matches the sequence
    state = m.initial_state(3)
    for t in range(7):
        step, state = m.step(z[:, t], idx[:, t], state)
    assert torch.allclose(step.h, out.h[:, -1], atol=1e-6)
    with pytest.raises(ValueError, match="action_n 4 needs action_dim 1"):
        MDNRNN(latent=5, action_dim=2, hidden=8, mixtures=2, action_n=4)


def test_breakout_fire_on_life_serves_the_ball():
    from rayworld.envs import make_env

    served = make_env("rayworld/Breakout-v0", fire_on_life=True)
    served.reset(seed=0)
    steps, terminated = 0, False
    while not terminated and steps < 2000:  # NOOP only: each served ball is missed, a life each time
        _, _, terminated, _, info = served.step(0)
        steps += 1
    assert terminated and info["lives"] == 0 and steps < 500
    waiting = make_env("rayworld/Breakout-v0")
    waiting.reset(seed=0)
    for _ in range(steps):
        _, _, terminated, _, info = waiting.step(0)
    assert not terminated and info["lives"] == 5  # the ball never came


def test_breakout_end_on_life_loss_ends_the_episode_at_the_first_lost_ball():
    from rayworld.envs import make_env

    def noop_episode(**kwargs):  # NOOP misses every served ball
        env = make_env("rayworld/Breakout-v0", fire_on_life=True, **kwargs)
        env.reset(seed=0)
        steps, terminated, truncated = 0, False, False
        while not (terminated or truncated) and steps < 2000:
            _, _, terminated, truncated, info = env.step(0)
            steps += 1
        return env, steps, terminated, info["lives"]

    env, one_life, terminated, lives = noop_episode(end_on_life_loss=True)
    assert terminated and lives == 4
    _, info = env.reset(seed=1)
    assert info["lives"] == 5  # the next episode is a new game
    _, whole_game, terminated, lives = noop_episode()
    assert terminated and lives == 0 and whole_game > 4 * one_life
    from rayworld.envs.registry import EnvArgumentError

    with pytest.raises(EnvArgumentError, match="env.kwargs.end_on_life_loss: expected true"):
        make_env("rayworld/Breakout-v0", end_on_life_loss="false")


def test_breakout_dilate_grows_the_ball_to_cells_a_vae_can_see():
    from rayworld.envs.atari import dilate
    from rayworld.envs.registry import EnvArgumentError, make_env

    frame = np.zeros((7, 9, 3), np.uint8)
    frame[0, 4] = 200  # one lit pixel on the top edge
    grown = dilate(frame, 2)
    lit = np.argwhere(grown[..., 0] == 200)
    assert grown.shape == frame.shape and len(lit) == 3 * 5  # the window, cut at the edge
    assert lit[:, 0].max() == 2 and (lit[:, 1].min(), lit[:, 1].max()) == (2, 6)
    assert dilate(frame, 0) is frame

    def ball_cells(d):  # lit cells between the bricks and the paddle, the ball in flight
        env = make_env("rayworld/Breakout-v0", fire_on_life=True, dilate=d)
        env.reset(seed=0)
        for _ in range(12):
            obs, *_ = env.step(0)
        return int((obs[29:56, 4:60].astype(int).sum(-1) > 60).sum())

    plain, dilated = ball_cells(0), ball_cells(2)
    assert 1 <= plain <= 2 and dilated >= 4, (plain, dilated)
    with pytest.raises(EnvArgumentError, match="env.kwargs.dilate: expected an integer"):
        make_env("rayworld/Breakout-v0", dilate=-1)


BREAKOUT_TINY = ["collect.episodes=6", "collect.max_steps=80", "vae.epochs=1", "vae.batch_size=32",
                 "vae.warmup_steps=0", "mdn.epochs=1", "mdn.seq_len=16", "mdn.batch_size=8",
                 "mdn.hidden=32", "evolve.generations=2", "evolve.population=4",
                 "evolve.rollouts=2", "evolve.max_steps=40", "evolve.real_episodes=0",
                 "evaluate.episodes=2", "evaluate.max_steps=100", "ray.cpus_per_worker=1",
                 "evolve.init=clone",  # the clone's discrete path: cross-entropy on logits
                 # the data ends at a lost ball; whatever scores a controller plays whole games
                 "env.kwargs.end_on_life_loss=true", "evaluate.env_kwargs.end_on_life_loss=false"]


@pytest.mark.slow  # about 2 min: every stage on Breakout
def test_breakout_pipeline_with_discrete_actions(ray_session, tmp_path):
    out = tmp_path / "breakout"
    args = ["pipeline", "--config", str(ROOT / "tune_configs/breakout.yaml"), "--out", str(out)]
    for item in BREAKOUT_TINY:
        args += ["--set", item]
    assert main(args) == 0
    info = Manifest.load(out / "data").info
    assert info["discrete"] is True and info["action_n"] == 4 and info["action_dim"] == 1
    # the shards hold the action index: Breakout has 4 actions, and the paddle policy moves
    actions = np.concatenate([list_array(open_shard(p).read().column("action"))
                              for p in sorted((out / "data" / "episodes").glob("*.parquet"))])
    assert set(np.unique(actions).tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert {2.0, 3.0} <= set(np.unique(actions).tolist())  # RIGHT and LEFT
    mdn = torch.load(out / "checkpoints" / "mdn.pt", weights_only=True)
    assert mdn["action_n"] == 4
    assert mdn["model"]["lstm.weight_ih_l0"].shape == (4 * 32, 32 + 4)  # z (32) + one-hot (4)
    # the preset's MLP controller: [z, h] -> 64 -> one logit per action; its argmax is the action
    ctrl = torch.load(out / "checkpoints" / "controller.pt", weights_only=True)
    assert ctrl["params"].numel() == (32 + 32) * 64 + 64 + 64 * 4 + 4
    report = json.loads((out / "report.json").read_text())
    assert report["episodes"] == 2 and report["real_return_mean"] >= 0
    from rayworld.config import load_config
    from rayworld.evaluate import RealRunner
    from rayworld.policies import run_episode

    runner = RealRunner(str(out), load_config(out / "config.yaml").to_dict())
    noop = run_episode(runner.env, lambda obs: 0, 0, 2000)
    assert noop[3][-1] and len(noop[2]) > 100  # all five lives (NOOP: 120 steps), not one (24)
    runner.close()
    from rayworld.dream import DreamEnv

    env = DreamEnv(str(out), max_steps=5)
    assert env.action_space.n == 4
    env.reset(seed=0)
    for a in (0, 3, 1):
        obs, reward, *_ = env.step(a)
        assert obs.shape == (32 + 32,) and np.isfinite(reward)


# ---------------------------------------------------------------- DeepMind Control


@pytest.fixture(scope="module")
def dmc():
    pytest.importorskip("dm_control", reason="the 'dmc' extra is not installed")
    from rayworld.envs import make_env

    env = make_env("rayworld/DMC-cheetah-run-v0")
    yield env
    env.close()


def test_dmc_from_pixels_is_a_checked_gymnasium_env(dmc):
    from gymnasium.utils.env_checker import check_env

    assert dmc.observation_space.shape == (64, 64, 3)
    assert dmc.action_space.shape == (6,)
    assert (dmc.action_space.low == -1).all() and (dmc.action_space.high == 1).all()
    check_env(dmc, skip_render_check=True)
    a, _ = dmc.reset(seed=5)
    b, _ = dmc.reset(seed=5)
    c, _ = dmc.reset(seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.std() > 10  # a rendered scene (floor, sky, body), not a blank frame


def test_dmc_steps_repeat_the_action_and_sum_rewards(dmc):
    from rayworld.envs.dmc import DMCPixels

    one = DMCPixels("cartpole", "swingup", action_repeat=1)
    two = DMCPixels("cartpole", "swingup", action_repeat=2)
    one.reset(seed=1)
    two.reset(seed=1)
    rewards = [one.step(np.array([0.5], np.float32))[1] for _ in range(4)]
    paired = [two.step(np.array([0.5], np.float32))[1] for _ in range(2)]
    assert paired == pytest.approx([rewards[0] + rewards[1], rewards[2] + rewards[3]], rel=1e-5)
    assert np.array_equal(one.render(), two.render())  # the same physics state after 4 steps
    with pytest.raises(ValueError, match="unknown DMC task 'cheetah-fly'"):
        DMCPixels("cheetah", "fly")
    with pytest.raises(ValueError, match=r"env.kwargs.camera_id: got 7, expected 0..1 \(cartpole"):
        DMCPixels("cartpole", "swingup", camera_id=7)
    with pytest.raises(ValueError, match="env.kwargs.action_repeat: got 0, expected an int >= 1"):
        DMCPixels("cartpole", "swingup", action_repeat=0)


def test_dmc_collects_shards_with_ray(dmc, ray_session, tmp_path):
    out = tmp_path / "dmc"
    assert main(["collect", "--out", str(out), "--set", "env.id=rayworld/DMC-walker-walk-v0",
                 "--set", "collect.episodes=2", "--set", "collect.max_steps=15"]) == 0
    m = Manifest.load(out / "data")
    assert m.info["action_dim"] == 6 and m.info["discrete"] is False
    assert sorted(m.shards) == [0, 1] and m.frames == 30
    table = open_shard(m.file(0)).read()
    actions = list_array(table.column("action"))
    assert actions.shape == (15, 6) and np.abs(actions).max() <= 1
    assert table.column("truncated").to_pylist()[-1] is True
