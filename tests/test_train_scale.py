"""Training at scale: the shared optimiser step, DDP against one worker, data sharding, and
recovery of a Ray Train run whose worker is killed. Real Ray Train on the session's local Ray.
"""

import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from rayworld.config import load_config
from rayworld.models.mdn import MDNRNN
from rayworld.models.vae import ConvVAE
from rayworld.train import common
from rayworld.train.optim import Stepper, lr_factor, param_groups
from rayworld.train.vae import GROUPS, make_stepper, step_losses

OPTIM = ["vae.latent=8", "vae.lr=2e-3", "vae.encoder_lr=1e-3", "vae.schedule=cosine",
         "vae.warmup_steps=1", "vae.min_lr=1e-4", "vae.grad_clip=50.0"]
GLOBAL_BATCH, STEPS = 16, 3


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(GLOBAL_BATCH, 3, 64, 64, generator=g) for _ in range(STEPS)]


def _train_vae_steps(model, stepper, rank: int, world: int):
    """STEPS optimiser steps on fixed global batches; this rank takes its slice of each."""
    for x in _batches():
        mine = x.chunk(world)[rank]
        for micro in mine.chunk(stepper.accum):
            with stepper.micro_batch():
                stepper.backward(step_losses(model, micro, 1.0, 0.5)["loss"])
    assert stepper.step == STEPS


def _fresh_vae():
    torch.manual_seed(0)
    model = ConvVAE(latent=8)
    model.eval()  # z = mu: no sampling noise, so ranks and runs see the same maths
    return model


def _ddp_loop(config: dict):
    import ray.train
    import ray.train.torch

    cfg, run_dir, rank, world, device = common.worker_setup(config)
    model = ray.train.torch.prepare_model(_fresh_vae())
    stepper = make_stepper(model, cfg.vae, STEPS, device)
    _train_vae_steps(model, stepper, rank, world)
    if rank == 0:
        torch.save(common.unwrap(model).state_dict(), run_dir / f"params-{world}.pt")
    ray.train.report({"step": stepper.step})


def _params_after(world: int, run_dir: Path) -> dict:
    cfg = load_config(overrides=OPTIM + [f"ray.num_workers={world}", "ray.cpus_per_worker=1",
                                         "ray.max_failures=0"])
    common.fit(_ddp_loop, cfg, run_dir, f"ddp{world}")
    return torch.load(run_dir / f"params-{world}.pt", weights_only=True)


def _rel_diff(a: dict, b: dict) -> float:
    """|a - b| relative to how far training moved a from the initial weights.

    Adam divides by the root of tiny second moments, so float rounding that differs between a
    full batch and its slices shows up in the update: about 1e-4 of it on an AVX-512 CPU, 9e-3
    on an AVX2 one (its conv kernels round differently by batch shape). A wrong gradient (a
    slice lost) shows up at order 1.
    """
    base = _fresh_vae().state_dict()
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    return num / sum(float(((a[k] - base[k]) ** 2).sum()) for k in a) ** 0.5


# --- plain torch, no Ray ---

def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 10, "cosine", 2, 0.1) for s in range(12)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[1:], f[2:]))  # never rises after warmup
    assert f[10] == pytest.approx(0.1) and f[11] == pytest.approx(0.1)
    assert lr_factor(7, 10, "constant", 2, 0.1) == 1.0


def test_per_module_learning_rates():
    cfg = load_config(overrides=OPTIM)
    model = _fresh_vae()
    stepper = make_stepper(model, cfg.vae, 100, "cpu")
    # warmup_steps=1: step 0 already runs at the full rate
    assert stepper.lrs == pytest.approx({"encoder": 1e-3, "decoder": 2e-3})
    owned = sum(len(g["params"]) for g in stepper.opt.param_groups)
    assert owned == len(list(model.parameters()))
    mdn = MDNRNN(latent=8, action_dim=2, hidden=16, mixtures=2)
    groups = param_groups(mdn, {"dynamics": ("lstm",), "heads": ("mdn_head", "reward_head",
                                                                  "done_head")},
                          {"dynamics": 3e-4}, 1e-3)
    assert [(g["name"], g["base_lr"]) for g in groups] == [("dynamics", 3e-4), ("heads", 1e-3)]
    with pytest.raises(ValueError, match="no learning-rate group"):
        param_groups(model, {"encoder": GROUPS["encoder"]}, {}, 1e-3)


def test_gradient_accumulation_equals_the_full_batch():
    full = _fresh_vae()
    _train_vae_steps(full, make_stepper(full, load_config(overrides=OPTIM).vae, STEPS, "cpu"),
                     0, 1)
    acc = _fresh_vae()
    cfg = load_config(overrides=OPTIM + ["vae.grad_accum=4"])
    _train_vae_steps(acc, make_stepper(acc, cfg.vae, STEPS, "cpu"), 0, 1)
    assert _rel_diff(full.state_dict(), acc.state_dict()) < 1e-3
    half = _fresh_vae()  # the same steps on half of each batch differ at order 1
    _train_vae_steps(half, make_stepper(half, load_config(overrides=OPTIM).vae, STEPS, "cpu"),
                     0, 2)
    assert _rel_diff(full.state_dict(), half.state_dict()) > 0.05


def test_gradient_clipping_bounds_the_step():
    model = torch.nn.Linear(4, 1)
    cfg = load_config(overrides=["vae.grad_clip=0.5", "vae.lr=1.0"]).vae
    stepper = Stepper(model, [{"params": list(model.parameters()), "name": "all",
                               "base_lr": 1.0}], cfg, 10, "cpu")
    stepper.opt = torch.optim.SGD(stepper.opt.param_groups, lr=1.0)  # step = -grad exactly
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    with stepper.micro_batch():
        stepper.backward((model(torch.full((8, 4), 100.0)) ** 2).mean())
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float((after - before).norm()) == pytest.approx(0.5, rel=1e-4)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs_the_forward_in_low_precision(amp):
    cfg = load_config(overrides=OPTIM + [f"vae.amp={amp}"])
    model = _fresh_vae()
    stepper = make_stepper(model, cfg.vae, STEPS, "cpu")
    seen = []
    model.decoder.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = _batches()[0]
    with stepper.micro_batch():
        losses = step_losses(model, x, 1.0, 0.5)
        stepper.backward(losses["loss"])
    assert seen == [{"bf16": torch.bfloat16, "fp16": torch.float16}[amp]]
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])
    assert stepper.step == 1
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    state = stepper.state_dict()
    assert state["opt_step"] == 1 and ("scale" in state["scaler"]) == (amp == "fp16")


# --- Ray Train ---

def test_ddp_two_workers_match_one_worker_on_the_same_global_batch(ray_session, tmp_path):
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    two = _params_after(2, tmp_path)
    one = _params_after(1, tmp_path)
    assert _rel_diff(two, one) < 0.05
    # what two workers would give if one's slice were lost (no all-reduce): order 1 away, so
    # the tolerance above catches it
    lost = _fresh_vae()
    _train_vae_steps(lost, make_stepper(lost, load_config(overrides=OPTIM).vae, STEPS, "cpu"),
                     0, 2)
    assert _rel_diff(lost.state_dict(), one) > 0.5
    assert _rel_diff(two, lost.state_dict()) > 0.5


def _copy_run(src: Path, dest: Path, with_models: bool) -> Path:
    shutil.copytree(src / "data", dest / "data")
    shutil.copy(src / "config.yaml", dest / "config.yaml")
    if with_models:
        (dest / "checkpoints").mkdir()
        shutil.copy(src / "checkpoints" / "vae.pt", dest / "checkpoints" / "vae.pt")
    return dest


def _last_state(run: Path, stage: str) -> dict:
    return torch.load(Path(common.last_checkpoint_dir(run, stage)) / "state.pt", weights_only=True)


def test_mdn_workers_read_distinct_episodes(tiny_run, tmp_path):
    from rayworld.data import Manifest, split_episodes
    from rayworld.encode import SERIES
    from rayworld.train.mdn import rank_episodes, train_mdn

    run = _copy_run(tiny_run, tmp_path / "run", with_models=True)
    cfg = load_config(run / "config.yaml", ["ray.num_workers=2", "mdn.epochs=1",
                                            "ray.cpus_per_worker=1"])
    series = Manifest.load(run / "data", SERIES, stage="encode")
    train_eps, val_eps = split_episodes(series.shards, cfg.data.val_every)
    mine = [rank_episodes(series, cfg, r, 2) for r in range(2)]
    assert not set(mine[0][0]) & set(mine[1][0]) and not set(mine[0][1]) & set(mine[1][1])
    assert sorted(mine[0][0] + mine[1][0]) == sorted(train_eps)

    train_mdn(cfg, run, log=lambda *a: None)
    state = _last_state(run, "mdn")
    assert state["world_size"] == 2
    # what the two workers really trained on, gathered from them during the run
    assert state["rank_episodes"] == [mine[0][0], mine[1][0]]
    assert not set(state["rank_episodes"][0]) & set(val_eps)


def _train_worker_pids(since: float) -> list[int]:
    """Ray Train workers started after `since` (older ones may belong to an earlier run)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::RayTrainWorker") and p.info["create_time"] >= since:
            found.append(p.pid)
    return found


def _committed_checkpoint(exp_dir: Path) -> bool:
    """Ray Train lists a checkpoint in its snapshot only once it is fully written."""
    import json

    try:
        snap = json.loads((exp_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return bool(snap.get("latest_checkpoint_result"))


@pytest.mark.slow  # about 70 s: kills a Train worker mid-run
def test_killed_training_worker_resumes_from_last_checkpoint(tiny_run, tmp_path):
    import os
    import signal

    from rayworld.train.vae import train_vae

    run = _copy_run(tiny_run, tmp_path / "run", with_models=False)
    cfg = load_config(run / "config.yaml", ["vae.epochs=3", "ray.max_failures=2"])
    outcome = {}
    started = time.time()
    thread = threading.Thread(target=lambda: outcome.update(train_vae(cfg, run, log=print)))
    thread.start()
    deadline = time.time() + 120
    while not _committed_checkpoint(run / "checkpoints" / "vae") and time.time() < deadline:
        time.sleep(0.05)
    pids = _train_worker_pids(started - 1)
    assert pids, "no Ray Train worker process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert outcome["vae_epochs"] == 3
    state = _last_state(run, "vae")
    assert state["epoch"] == 3
    # it went on from a checkpoint, not from scratch, and kept one history entry per epoch
    assert len(state["resumed_from"]) == 1 and 1 <= state["resumed_from"][0] < 3
    assert len(state["history"]["loss"]) == 3
