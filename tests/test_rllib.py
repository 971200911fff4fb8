"""RLlib PPO in the dream (rayworld.rllib) on a copy of the tiny trained run (conftest.tiny_run)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rayworld.config import ConfigError
from rayworld.io import read_json

ROOT = Path(__file__).resolve().parents[1]
PPO_YAML = ROOT / "tune_configs" / "rllib_ppo.yaml"
# Two tiny PPO iterations: 256 dream steps each, 8 dreams per batch, 2 real episodes.
TINY = ["iterations=2", "train_batch_size=256", "minibatch_size=64", "num_epochs=1",
        "num_envs_per_env_runner=8", "hidden=[16]", "eval_episodes=2", "dream_eval_rollouts=8",
        "checkpoint_every=1"]


@pytest.fixture(scope="module")
def rllib_run(tiny_run, tmp_path_factory):
    """PPO trained on a copy of tiny_run (other tests read tiny_run itself)."""
    from rayworld.rllib import train_rllib

    run = tmp_path_factory.mktemp("rllib") / "run"
    shutil.copytree(tiny_run, run)
    logs = []
    figures = train_rllib(run, PPO_YAML, TINY, log=logs.append)
    return run, figures, logs


def _tiny_cfg(run):
    from rayworld.config import load_config

    return load_config(base=yaml.safe_load((run / "config.yaml").read_text()))


def test_train_writes_checkpoint_report_plot_and_tensorboard(rllib_run):
    run, figures, logs = rllib_run
    assert [line for line in logs if line.startswith("rllib iter")][-1].startswith("rllib iter 2/2")
    assert figures["rllib_iterations"] == 2 and figures["rllib_env_steps"] == 512
    assert figures["rllib_episodes"] == 2 and np.isfinite(figures["rllib_dream_return"])
    assert figures["rllib_train_s"] < figures["wall_s"]
    report = read_json(run / "report.json")
    for key in ("rllib_real_return_mean", "rllib_real_return_std", "rllib_real_return_se",
                "rllib_dream_return", "rllib_iterations", "rllib_env_steps"):
        assert report[key] == pytest.approx(figures[key]), key
    assert report["wall_s"]["train-rllib"] == pytest.approx(figures["wall_s"], abs=0.01)
    assert "real_return_mean" in report  # the evolved controller's figures are kept
    ckpt = run / "checkpoints" / "rllib"
    assert (ckpt / "rllib_checkpoint.json").exists()
    assert json.loads((ckpt / "history.json").read_text())["iteration"] == [1, 2]
    assert (run / "images" / "rllib_curves.png").stat().st_size > 1000
    assert list((run / "tensorboard" / "rllib").glob("events.out.tfevents.*"))
    saved = yaml.safe_load((run / "rllib.yaml").read_text())
    assert saved["iterations"] == 2 and saved["hidden"] == [16] and saved["lambda"] == 0.95


def test_checkpoint_loads_and_actions_are_in_the_action_space(rllib_run):
    from ray.rllib.algorithms.algorithm import Algorithm

    from rayworld.dream import DreamVectorEnv
    from rayworld.rllib import load_policy, register_dream_env

    run, _, _ = rllib_run
    register_dream_env()
    algo = Algorithm.from_checkpoint(str(run / "checkpoints" / "rllib"))
    try:
        assert algo.training_iteration == 2
        module = algo.get_module()
    finally:
        algo.stop()
    env = DreamVectorEnv(str(run), num_envs=16, max_steps=30)
    obs, _ = env.reset(seed=0)
    policy = load_policy(run / "checkpoints" / "rllib", env.single_action_space)
    z, h = torch.from_numpy(obs[:, :32]), torch.from_numpy(obs[:, 32:])
    actions = policy(z, h).numpy()
    assert actions.shape == (16, 3)
    assert all(env.single_action_space.contains(a.astype(np.float32)) for a in actions)
    # the mean action: what the restored algorithm's module gives, unsquashed to the bounds
    inputs = module.forward_inference({"obs": torch.from_numpy(obs)})["action_dist_inputs"]
    mean = np.clip(inputs[:, :3].detach().numpy(), -1, 1)
    low, high = env.single_action_space.low, env.single_action_space.high
    np.testing.assert_allclose(actions, low + (mean + 1) * (high - low) / 2, atol=1e-5)


def test_real_return_equals_a_rerun_on_the_same_seeds(rllib_run):
    from rayworld.dream import WorldModel, dream_spaces
    from rayworld.evaluate import RealRunner
    from rayworld.rllib import load_policy

    run, figures, _ = rllib_run
    cfg = _tiny_cfg(run)
    threads = torch.get_num_threads()
    try:  # in this process, one episode at a time, vs the figures from the Ray actors
        runner = RealRunner(str(run), cfg.to_dict())
        policy = load_policy(run / "checkpoints" / "rllib", dream_spaces(WorldModel.load(run))[1])
        returns = [runner.episode(policy, cfg.evaluate.seed + i, cfg.evaluate.max_steps)
                   for i in range(2)]
    finally:
        torch.set_num_threads(threads)
    assert np.mean(returns) == pytest.approx(figures["rllib_real_return_mean"], abs=1e-6)
    assert np.std(returns) == pytest.approx(figures["rllib_real_return_std"], abs=1e-6)


def test_rerun_resumes_at_the_saved_iteration_within_the_time_budget(rllib_run, tmp_path):
    from rayworld.rllib import train_rllib

    src, _, _ = rllib_run
    run = tmp_path / "again"
    shutil.copytree(src, run)
    logs = []
    # no --config: the run's saved rllib.yaml; a tiny budget stops after one more iteration
    figures = train_rllib(run, None, ["iterations=50", "time_budget_s=0.001"], log=logs.append)
    text = "\n".join(logs)
    assert "resuming after iteration 2" in text and "rllib iter 3/50" in text
    assert "rllib iter 1/" not in text and "rllib iter 4/50" not in text
    assert "time budget" in text
    assert figures["rllib_iterations"] == 3 and figures["rllib_env_steps"] == 3 * 256
    history = json.loads((run / "checkpoints" / "rllib" / "history.json").read_text())
    assert history["iteration"] == [1, 2, 3]
    assert read_json(run / "report.json")["rllib_iterations"] == 3


def test_bad_algorithm_key_or_value_is_one_line_naming_file_and_key(tiny_run, tmp_path):
    from rayworld.rllib import load_rllib_config, train_rllib

    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: PPO\nlamda: 0.9\n")
    with pytest.raises(ConfigError) as e:
        load_rllib_config(bad)
    msg = str(e.value)
    assert str(bad) in msg and "'lamda'" in msg and "lambda" in msg and "\n" not in msg
    bad.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: rllib key 'lr'.*expected float"):
        load_rllib_config(bad)
    with pytest.raises(ConfigError, match=r"'algorithm'.*'PPO'"):
        load_rllib_config(PPO_YAML, ["algorithm=DQN"])
    with pytest.raises(ConfigError, match=r"--set num_epochs=0: rllib key 'num_epochs'.*> 0"):
        load_rllib_config(PPO_YAML, ["num_epochs=0"])
    run = tmp_path / "run"  # train_rllib fails before it writes anything into the run
    run.mkdir()
    shutil.copy(tiny_run / "config.yaml", run / "config.yaml")
    bad.write_text("hiden: [8]\n")
    with pytest.raises(ConfigError, match=r"unknown rllib key 'hiden'"):
        train_rllib(run, bad, [])
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_run_without_world_model_names_the_stage(ray_session, tmp_path):
    from rayworld.rllib import train_rllib

    (tmp_path / "config.yaml").write_text("name: empty\n")
    with pytest.raises(FileNotFoundError, match="rayworld train-mdn"):
        train_rllib(tmp_path, PPO_YAML, [])
    with pytest.raises(FileNotFoundError, match="config.yaml not found"):
        train_rllib(tmp_path / "missing", PPO_YAML, [])


def test_yaml_defaults_match_the_dataclass():
    from rayworld.rllib import RLlibConfig, load_rllib_config

    assert load_rllib_config(PPO_YAML) == RLlibConfig()


def test_dream_vector_env_is_deterministic_and_autoresets(tiny_run):
    from rayworld.dream import DreamVectorEnv

    env = DreamVectorEnv(str(tiny_run), num_envs=4, max_steps=5)
    actions = np.random.default_rng(0).uniform([-1, 0, 0], 1, (6, 4, 3)).astype(np.float32)

    def play(seed):
        obs, _ = env.reset(seed=seed)
        out = [obs]
        for a in actions:
            obs, reward, term, trunc, _ = env.step(a)
            out.append((obs, reward, term, trunc))
        return out

    first, again = play(3), play(3)
    np.testing.assert_array_equal(first[0], again[0])
    for (o1, r1, *_), (o2, r2, *_) in zip(first[1:], again[1:]):
        np.testing.assert_array_equal(o1, o2)
        np.testing.assert_array_equal(r1, r2)
    assert not np.array_equal(play(4)[0], first[0])
    assert first[0].dtype == np.float32 and first[0].shape == (4, 32 + 64)
    # step 5 ends every dream still running (max_steps); the step after a dream ends is its
    # reset: reward 0, not done, and a fresh LSTM state (h = 0)
    ended = np.zeros(4, bool)
    for _, reward, term, trunc in first[1:6]:
        assert reward.dtype == np.float32 and not np.any(term & trunc)
        ended |= term | trunc
    assert ended.all()
    _, _, term5, trunc5 = first[5]
    obs, reward, term, trunc = first[6]
    fresh = term5 | trunc5
    assert fresh.any()
    assert np.all(reward[fresh] == 0) and not np.any(term[fresh] | trunc[fresh])
    assert np.all(obs[fresh, 32:] == 0) and np.all(obs[~fresh, 32:] != 0)
