"""The CEM planner (controller.kind mpc): its search in plain torch, then the stages it plugs
into on the tiny pipeline's world model."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rayworld.cli import main
from rayworld.config import ConfigError, PlanConfig, load_config
from rayworld.data import Manifest
from rayworld.dream import WorldModel
from rayworld.models.mdn import MDNRNN
from rayworld.plan import Planner


def _world(discrete: bool = False) -> WorldModel:
    """A small MDN-RNN with random weights: its reward still depends on the actions (through
    h), which is all a planner needs to have something to search."""
    torch.manual_seed(0)
    if discrete:
        mdn = MDNRNN(latent=4, action_dim=1, hidden=16, mixtures=2, action_n=4)
        return WorldModel(mdn.eval(), torch.randn(8, 4), torch.zeros(8, 4), 1, True, 4)
    mdn = MDNRNN(latent=4, action_dim=3, hidden=16, mixtures=2)
    return WorldModel(mdn.eval(), torch.randn(8, 4), torch.zeros(8, 4), 3, False, 0)


def _start(world):
    return world.z0_mu[:1], world.mdn.initial_state(1)


def _full_plan(planner, first):
    """The whole plan replan() settled on: its first action, then the shifted rest."""
    if planner.discrete:
        return torch.cat([first, planner.plan[:-1].argmax(-1)])[None]
    return torch.cat([first, planner.plan[:-1]])[None]


@pytest.mark.parametrize("discrete", [False, True])
def test_cem_plan_beats_random_action_sequences_in_the_same_dream(discrete):
    world = _world(discrete)
    pc = PlanConfig(horizon=8, candidates=64, iterations=4, elites=8, action_repeat=1)
    planner = Planner(world, pc, seed=0)
    z, state = _start(world)
    first = planner.replan(z, state)
    planned = planner.score(z, state, _full_plan(planner, first))[0]
    gen = torch.Generator().manual_seed(1)
    if discrete:
        rand = torch.randint(4, (256, 8), generator=gen)
    else:
        rand = torch.rand(256, 8, 3, generator=gen) * (planner.high - planner.low) + planner.low
    others = planner.score(z, state, rand)
    # the search found a plan at least as good as 99% of random ones (tau 0: the same dream)
    assert (others <= planned + 1e-6).float().mean() > 0.99, (planned, others.max())
    assert planned > others.median() + 3 * others.std() / 16  # well clear of the typical one
    # and its iterations helped: one iteration of the same search scores lower
    one = Planner(world, PlanConfig(**{**pc.__dict__, "iterations": 1}), seed=0)
    assert one.score(z, state, _full_plan(one, one.replan(z, state)))[0] < planned


def test_all_candidates_in_one_batch_score_as_one_at_a_time():
    world = _world()
    planner = Planner(world, PlanConfig(horizon=6, rollouts=1), seed=0)
    z, state = _start(world)
    state = tuple(s + 0.1 for s in state)  # mid-episode: not the zero state
    acts = torch.rand(16, 6, 3) * (planner.high - planner.low) + planner.low
    batched = planner.score(z, state, acts)
    single = torch.stack([planner.score(z, state, acts[i:i + 1])[0] for i in range(16)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_plan_acts_every_action_repeat_steps_and_warm_starts():
    world = _world()
    pc = PlanConfig(horizon=5, candidates=16, iterations=2, elites=4, action_repeat=3)
    planner = Planner(world, pc, seed=0)
    z, state = _start(world)
    calls = []
    replan = planner.replan
    planner.replan = lambda *a: calls.append(1) or replan(*a)
    acts = [planner.act(z, state) for _ in range(7)]
    assert len(calls) == 3  # steps 0, 3 and 6
    assert torch.equal(acts[0], acts[1]) and torch.equal(acts[0], acts[2])
    assert planner.plan.shape == (5, 3)
    lo, hi = planner.low, planner.high
    assert all(((a >= lo) & (a <= hi)).all() for a in acts)
    planner.reset()
    assert planner.plan is None and planner.action is None


def test_nonsense_plan_knobs_are_one_line_naming_the_key():
    for sets, match in [(["plan.elites=100", "plan.candidates=10"], r"'plan.elites'.*at most"),
                        (["plan.horizon=0"], r"'plan.horizon'.*> 0"),
                        (["plan.iterations=-1"], r"'plan.iterations'.*> 0"),
                        (["plan.tau=-0.5"], r"'plan.tau'.*>= 0"),
                        (["plan.dropout=always"], r"'plan.dropout'.*'rollout'"),
                        (["controller.kind=planner"], r"'controller.kind'.*'mpc'")]:
        with pytest.raises(ConfigError, match=match) as e:
            load_config(None, sets)
        assert "\n" not in str(e.value)


def test_planner_without_a_world_model_names_the_stage(ray_session, tmp_path, capsys):
    assert main(["evolve", "--out", str(tmp_path), "--set", "controller.kind=mpc"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train-vae" in err, err


def test_planner_plugs_into_evolve_evaluate_status_and_dream_gif(tiny_run, tmp_path, capsys):
    run = tmp_path / "mpc"
    shutil.copytree(tiny_run, run)
    plan = ["controller.kind=mpc", "plan.horizon=4", "plan.candidates=16", "plan.elites=4",
            "plan.iterations=2"]
    sets = [x for item in plan for x in ("--set", item)]
    assert main(["status", "--run", str(run), *sets]) == 0
    out = capsys.readouterr().out
    assert "controller.kind changed ('linear' -> 'mpc')" in out
    assert main(["pipeline", "--out", str(run), *sets]) == 0
    out = capsys.readouterr().out
    assert "nothing to evolve" in out
    # evolve ran again for the kind; the world model (shared with other tests) is not checked
    assert "evolve is stale (controller.kind changed ('linear' -> 'mpc'))" in out
    state = torch.load(run / "checkpoints" / "controller.pt", weights_only=True)
    assert state["kind"] == "mpc" and state["params"].numel() == 0
    report = json.loads((run / "report.json").read_text())
    assert report["controller_kind"] == "mpc" and report["episodes"] == 4
    assert np.isfinite(report["real_return_mean"])
    # a planner knob makes evaluate stale, and only evaluate
    assert main(["status", "--run", str(run), *sets, "--set", "plan.horizon=6"]) == 0
    out = capsys.readouterr().out
    assert "plan.horizon changed (4 -> 6)" in out
    assert [ln.split(":")[0].strip() for ln in out.splitlines() if "stale" in ln] == ["evaluate"]
    assert main(["dream-gif", "--out", str(run), "--steps", "6", *sets]) == 0
    assert (run / "images" / "dream_vs_real.gif").stat().st_size > 0
    # the planner collects, as the policy of an --iterations round, with exploration noise
    assert main(["collect", "--out", str(run), *sets, "--set", "collect.policy=controller",
                 "--set", "collect.episodes=14"]) == 0
    m = Manifest.load(run / "data")
    assert sorted(m.shards) == list(range(14))
    assert pq.read_schema(m.file(13)).metadata[b"rayworld.policy"] == b"controller"
