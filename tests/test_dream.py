"""The dream, evolution and evaluation on the tiny trained run (see conftest.tiny_run)."""

import shutil
import threading
import time

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from rayworld.cli import main
from rayworld.config import load_config
from rayworld.dream import BatchedDream, WorldModel, evaluate_population
from rayworld.models.controller import Controller


def test_dream_env_passes_check_env(tiny_run):
    from rayworld.envs import make_env

    env = make_env("rayworld/Dream-v0", run_dir=str(tiny_run), max_steps=20)
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (32 + 64,) and obs.dtype == np.float32
    obs2, r, term, trunc, _ = env.step(env.action_space.sample())
    assert np.isfinite(obs2).all() and isinstance(r, float)


def test_batched_population_matches_one_candidate_at_a_time(tiny_run):
    world = WorldModel.load(tiny_run)
    dream = BatchedDream(world, tau=0.0001, max_steps=15)  # tau ~ 0: nearly deterministic
    template = Controller(world.latent, world.hidden, world.action_dim)
    params = np.random.default_rng(0).normal(0, 0.5, (3, template.num_params))
    together = evaluate_population(dream, template, params, rollouts=2, seed=5)
    assert together.shape == (3,)
    # the same candidate alone, starting from the same first latents (common to all 3)
    gen = torch.Generator().manual_seed(5)
    z0, _ = dream.reset(6, gen, shared=3)
    assert torch.equal(z0[0:2], z0[4:6])
    for p in range(3):
        alone = Controller(world.latent, world.hidden, world.action_dim)
        alone.set_flat(params[p])
        z, state = z0[2 * p:2 * p + 2].clone(), world.mdn.initial_state(2)
        total = torch.zeros(2)
        alive = torch.ones(2, dtype=torch.bool)
        g = torch.Generator().manual_seed(1)
        for _ in range(15):
            z, state, reward, done = dream.step(z, state, alone(z, state[0][0]), g)
            total += reward * alive
            alive &= ~done
        assert together[p] == pytest.approx(float(total.mean()), abs=0.05)


def test_common_random_numbers_rank_controllers_not_luck(tiny_run):
    """With common random numbers, identical candidates score identically at tau 1; without,
    the dream's noise alone tells them apart."""
    world = WorldModel.load(tiny_run)
    dream = BatchedDream(world, tau=1.0, max_steps=30)
    template = Controller(world.latent, world.hidden, world.action_dim)
    one = np.random.default_rng(1).normal(0, 0.5, template.num_params)
    params = np.stack([one] * 4)
    shared = evaluate_population(dream, template, params, rollouts=3, seed=9, common=True)
    assert np.ptp(shared) == 0
    apart = evaluate_population(dream, template, params, rollouts=3, seed=9, common=False)
    assert np.ptp(apart) > 0


def test_anchor_costs_the_action_gap_to_the_reference(tiny_run):
    """Fitness = dream return - anchor x sum of squared action gaps to the reference: zero
    for the reference itself, and linear in the anchor for any other candidate."""
    import dataclasses

    world = WorldModel.load(tiny_run)
    dream = BatchedDream(world, tau=1.0, max_steps=20)
    template = Controller(world.latent, world.hidden, world.action_dim)
    rng = np.random.default_rng(2)
    params = rng.normal(0, 0.5, (2, template.num_params))
    plain = evaluate_population(dream, template, params, rollouts=3, seed=4)
    one = evaluate_population(dream, template, params, 3, 4, ref_params=params[0], anchor=1.0)
    three = evaluate_population(dream, template, params, 3, 4, ref_params=params[0], anchor=3.0)
    assert one[0] == pytest.approx(plain[0], abs=1e-5)  # the reference pays nothing
    cost = plain[1] - one[1]
    assert cost > 0.1  # a different controller pays for every step it differs
    assert plain[1] - three[1] == pytest.approx(3 * cost, rel=1e-4)
    a, b = torch.tensor([[0.5, 1.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.5]])
    assert dream.action_gap(a, b).tolist() == [0.5]
    discrete = BatchedDream(dataclasses.replace(world, discrete=True))
    assert discrete.action_gap(torch.tensor([1, 2, 0]), torch.tensor([1, 0, 0])).tolist() == \
        [0.0, 1.0, 0.0]


def test_killed_evaluator_share_is_redone(tiny_run):
    import ray

    from rayworld.evolve import EvolveWorker, _score

    cfg = load_config(tiny_run / "config.yaml", ["evolve.max_steps=1000"])
    cls = ray.remote(num_cpus=0.5, max_restarts=3, max_task_retries=0)(EvolveWorker)
    workers = [cls.options(name=f"test-dream-evaluator-{i}").remote(str(tiny_run),
                                                                   cfg.to_dict())
               for i in range(2)]
    n = ray.get(workers[0].num_params.remote())
    params = np.random.default_rng(1).normal(0, 0.1, (64, n))
    reference = _score(workers, params, 16, seed=3, log=print)  # also warms both actors up
    t0 = time.time()
    np.testing.assert_allclose(_score(workers, params, 16, seed=3, log=print), reference)
    took = time.time() - t0  # the kill must land while the shares are being scored
    logs = []
    killer = threading.Timer(min(0.5, took / 3), lambda: ray.kill(workers[0], no_restart=False))
    killer.start()
    t0 = time.time()
    fitness = _score(workers, params, 16, seed=3, log=logs.append)
    killer.join()
    assert any("died" in line for line in logs), f"the kill came too late ({time.time() - t0:.1f} s)"
    np.testing.assert_allclose(fitness, reference, rtol=1e-5)
    for w in workers:
        ray.kill(w)


def test_evolve_resumes_from_saved_state(tiny_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    assert main(["evolve", "--out", str(run), "--set", "evolve.generations=7"]) == 0
    out = capsys.readouterr().out
    assert "resuming after generation 6" in out and "evolve gen 7/7" in out
    assert "evolve gen 6/7" not in out
    state = torch.load(run / "checkpoints" / "controller.pt", weights_only=True)
    assert state["generation"] == 7 and state["params"].numel() == (32 + 64) * 3 + 3


def test_evaluate_without_controller_names_the_stage(ray_session, tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "rayworld evolve" in err and "no controller" in err


def test_incompatible_latent_size_is_named(tiny_run, capsys):
    assert main(["train-mdn", "--out", str(tiny_run), "--set", "vae.latent=16"]) == 1
    err = capsys.readouterr().err
    assert "latent 32" in err and "vae.latent is 16" in err


@pytest.mark.slow  # ~1.5-2 min: a second full pipeline round
def test_iterative_pipeline_collects_with_the_controller(tiny_run, tmp_path):
    import pyarrow.parquet as pq

    from rayworld.data import Manifest
    from rayworld.io import read_json

    run = tmp_path / "iter"
    shutil.copytree(tiny_run, run)
    assert main(["pipeline", "--out", str(run), "--iterations", "2"]) == 0
    m = Manifest.load(run / "data")
    assert sorted(m.shards) == list(range(24))
    policies = {e: pq.read_schema(m.file(e)).metadata[b"rayworld.policy"] for e in (0, 12, 23)}
    assert policies == {0: b"drive", 12: b"controller", 23: b"controller"}
    assert torch.load(run / "checkpoints" / "vae.pt", weights_only=True)["epoch"] == 2
    assert torch.load(run / "checkpoints" / "mdn.pt", weights_only=True)["epoch"] == 4
    assert torch.load(run / "checkpoints" / "controller.pt", weights_only=True)["generation"] == 12
    assert read_json(run / "report.json")["evaluated_generation"] == 12
    # a re-run picks up in round 2 and finds it done: round 1's stages are not judged
    # against round 2's data
    ctrl = (run / "checkpoints" / "controller.pt").read_bytes()
    assert main(["pipeline", "--out", str(run), "--iterations", "2"]) == 0
    assert (run / "checkpoints" / "controller.pt").read_bytes() == ctrl
    assert not (run / "checkpoints" / "stale").exists()


def test_iterations_without_generations_are_refused(tiny_run, capsys):
    """0 generations x N rounds would count evolve as done and keep round 1's controller."""
    before = (tiny_run / "checkpoints" / "controller.pt").read_bytes()
    assert main(["pipeline", "--out", str(tiny_run), "--iterations", "2",
                 "--set", "evolve.generations=0"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "evolve.generations > 0" in err, err
    assert (tiny_run / "checkpoints" / "controller.pt").read_bytes() == before


def test_done_probability_undoes_the_positive_weight():
    from rayworld.models.mdn import MDNRNN

    world = WorldModel(MDNRNN(4, 3, 8, 2), torch.zeros(1, 4), torch.zeros(1, 4), 3, False, 0,
                       done_pos_weight=10.0)
    logits = torch.tensor([0.0, float(np.log(10.0)), 5.0])
    np.testing.assert_allclose(world.done_prob(logits).numpy(), [1 / 11, 0.5, 1 / (1 + 10 * np.exp(-5))],
                               rtol=1e-5)


def test_start_latents_are_read_from_one_file_written_at_encode(tiny_run, tmp_path):
    """Dream and agent actors read every episode's first latent from data/series/starts.npz,
    not from each series file; a run encoded before that file existed still loads."""
    from rayworld.data import STARTS, Manifest, first_latents, load_starts, save_starts
    from rayworld.encode import SERIES, encode

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    series = Manifest.load(run / "data", SERIES)
    expected = np.stack([first_latents(series.file(e))[0] for e in sorted(series.shards)])
    assert (run / "data" / STARTS).exists()
    world = WorldModel.load(run)
    np.testing.assert_array_equal(world.z0_mu.numpy(), expected)
    # with every series file gone, start-up still has all it needs
    hidden = tmp_path / "hidden"
    shutil.move(run / "data" / "series", hidden)
    (run / "data" / "series").mkdir()
    shutil.copy(hidden / "starts.npz", run / "data" / STARTS)
    np.testing.assert_array_equal(WorldModel.load(run).z0_mu.numpy(), expected)
    shutil.rmtree(run / "data" / "series")  # the series files back
    shutil.move(hidden, run / "data" / "series")
    # another VAE's file is not read: the series files are
    vid = series.info["vae"]
    assert len(load_starts(run / "data", vid)) == len(series.shards)
    save_starts(run / "data", "another-vae", {e: (m * 0 + 9, m) for e, (m, _) in
                                              load_starts(run / "data", vid).items()})
    np.testing.assert_array_equal(WorldModel.load(run).z0_mu.numpy(), expected)
    # an older run without the file: read from the series files, and encode writes it again
    (run / "data" / STARTS).unlink()
    np.testing.assert_array_equal(WorldModel.load(run).z0_mu.numpy(), expected)
    cfg = load_config(run / "config.yaml")
    encode(cfg, run, log=lambda _: None)
    assert (run / "data" / STARTS).exists()
    np.testing.assert_array_equal(WorldModel.load(run).z0_mu.numpy(), expected)


def test_data_starts_carry_the_lstm_state_of_their_episode_up_to_there(tiny_run):
    """evolve.start data: a dream starts at a real step with the LSTM state that the
    episode's real latents and actions give there (zero at an episode's first frame)."""
    from rayworld.data import Manifest, read_series
    from rayworld.dream import data_starts
    from rayworld.encode import SERIES

    world = WorldModel.load(tiny_run)
    series = Manifest.load(tiny_run / "data", SERIES, stage="encode")
    episodes = sorted(series.shards)
    lengths = [int(series.shards[e]["steps"]) for e in episodes]
    mu, logvar, h, c = data_starts(world.mdn, series, 10**9, seed=0, sample=False)
    assert len(mu) == len(h) == sum(lengths)  # every step, in step order
    second = lengths[0]  # the second episode's first frame
    assert not h[0].any() and not c[second].any()
    ep = read_series(series.file(episodes[1]))
    t = min(7, lengths[1] - 1)
    x = torch.cat([torch.from_numpy(ep["mu"][:t]), torch.from_numpy(ep["action"][:t])], 1)
    with torch.no_grad():
        _, (h_t, c_t) = world.mdn.lstm(x.float().unsqueeze(0))
    assert torch.allclose(h[second + t], h_t[0, 0], atol=1e-5)
    assert torch.allclose(c[second + t], c_t[0, 0], atol=1e-5)
    assert torch.equal(mu[second + t], torch.from_numpy(ep["mu"][t]))
    a = data_starts(world.mdn, series, 50, seed=3)
    assert torch.equal(a[2], data_starts(world.mdn, series, 50, seed=3)[2])
    assert not torch.equal(a[2], data_starts(world.mdn, series, 50, seed=4)[2])
    # a dream from data starts begins in those states; the same rows of every block alike
    starts = world.with_data_starts(tiny_run, 50, seed=3)
    assert torch.equal(starts.h0, a[2])
    z, (h0, c0) = BatchedDream(starts).reset(8, torch.Generator().manual_seed(0), shared=2)
    assert h0.shape == (1, 8, world.hidden) and h0[0].abs().sum() > 0
    assert all((row == a[2]).all(1).any() for row in h0[0])
    assert torch.equal(h0[0, :4], h0[0, 4:])
