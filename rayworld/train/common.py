"""What the VAE and MDN-RNN trainers share: the TorchTrainer wiring, checkpoints, logging.

The train loops run inside Ray Train workers. They receive the resolved config as a dict and
absolute paths (Ray Train changes the working directory).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from rayworld.config import Config
from rayworld.io import atomic_path


class TrainError(RuntimeError):
    """Training stopped; the message says why and what was kept."""


class NonFiniteLoss(TrainError):
    pass


def fit(loop, cfg: Config, run_dir: Path, name: str, extra: dict | None = None):
    """Run `loop` in a TorchTrainer; re-running the same run_dir resumes from its checkpoint."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_dir = Path(run_dir).resolve()
    scaling = ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                            resources_per_worker={"CPU": cfg.ray.cpus_per_worker})
    trainer = TorchTrainer(
        loop,
        train_loop_config={"cfg": cfg.to_dict(), "run_dir": str(run_dir), **(extra or {})},
        scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name, storage_path=str(run_dir / "checkpoints"),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=0)),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainError(_root_message(e, name)) from None


def _root_message(err: BaseException, name: str) -> str:
    """The first line of the error raised inside the worker, not Ray's wrapper text."""
    seen = err
    for _ in range(10):
        nxt = getattr(seen, "worker_failures", None) or getattr(seen, "error", None)
        if isinstance(nxt, dict) and nxt:
            nxt = next(iter(nxt.values()))
        if nxt is None or nxt is seen:
            nxt = seen.__cause__
        if nxt is None:
            break
        seen = nxt
    text = str(seen).strip().splitlines()
    lines = [ln for ln in text if ln.strip()]
    for ln in reversed(lines):  # the worker's own exception line
        if "Error:" in ln or "Loss:" in ln:
            return f"{name}: {ln.split('Error: ', 1)[-1].split('Loss: ', 1)[-1].strip()}"
    return f"{name}: {lines[-1] if lines else type(seen).__name__}"


def load_state(checkpoint) -> dict | None:
    """The training state saved in a Ray Checkpoint (None to start fresh)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / "state.pt", weights_only=True, map_location="cpu")


def report(metrics: dict, state: dict | None):
    """Report metrics from every rank; rank 0 also hands Ray a checkpoint of `state`."""
    import ray.train
    from ray.train import Checkpoint

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / "state.pt")
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def check_finite(losses: dict, stage: str, epoch: int, step: int, last_ckpt: str):
    for key, value in losses.items():
        v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if not math.isfinite(v):
            raise NonFiniteLoss(
                f"{stage} {key} became {v} at epoch {epoch + 1} step {step}; training stopped, "
                f"last good checkpoint kept: {last_ckpt} (try a lower lr or grad_clip)")


def allreduce_sum(values: dict[str, float], device) -> dict[str, float]:
    """Sum scalars over DDP ranks (no-op with one worker)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def unwrap(model):
    return getattr(model, "module", model)


def export_model(result, dest: Path, extra: dict):
    """Copy the final weights out of Ray's checkpoint into a plain state file for later stages."""
    if result.checkpoint is None:
        raise TrainError(f"no checkpoint was written; cannot export {dest}")
    state = load_state(result.checkpoint)
    with atomic_path(dest) as tmp:
        torch.save({"model": state["model"], "epoch": state["epoch"], **extra}, tmp)
    return state


def load_model_file(path: Path, stage: str) -> dict:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} not found: run `rayworld {stage}` first")
    return torch.load(path, weights_only=True, map_location="cpu")


def last_checkpoint_dir(run_dir: Path, name: str) -> str:
    root = Path(run_dir) / "checkpoints" / name
    found = sorted(p for p in root.glob("checkpoint_*") if p.is_dir()) if root.exists() else []
    return str(found[-1]) if found else "none yet"


def tb_writer(run_dir: Path, name: str):
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(Path(run_dir) / "tensorboard" / name))


def worker_setup(config: dict):
    """Inside a Train worker: (cfg, run_dir, rank, world_size, device)."""
    import ray.train
    import ray.train.torch

    from rayworld.config import load_config

    cfg = load_config(base=config["cfg"])
    # Ray Train sets OMP_NUM_THREADS=1; give torch the CPUs this worker reserved.
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    ctx = ray.train.get_context()
    return (cfg, Path(config["run_dir"]), ctx.get_world_rank(), ctx.get_world_size(),
            ray.train.torch.get_device())
