"""What the VAE and MDN-RNN trainers share: the TorchTrainer wiring, checkpoints, logging.

The train loops run inside Ray Train workers. They receive the resolved config as a dict and
absolute paths (Ray Train changes the working directory).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from rayworld.config import Config
from rayworld.io import atomic_path


def say(line: str):
    """One line for the console, from a train worker. Ray Train's patched print would send it
    both to its logger and to stdout, so it showed twice."""
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


class Ticker:
    """Progress within a long epoch: a line every `every` seconds, none for short epochs."""

    def __init__(self, label: str, total: int, every: float = 30.0, on: bool = True):
        self.label, self.total, self.every, self.on = label, total, every, on
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int):
        now = time.perf_counter()
        if self.on and now - self.last >= self.every and 0 < done < self.total:
            self.last = now
            left = (now - self.start) / done * (self.total - done)
            say(f"{self.label}: {done}/{self.total} batches ({100 * done / self.total:.0f}%), "
                f"about {left:.0f} s left in this epoch")


class TrainError(RuntimeError):
    """Training stopped; the message says why and what was kept."""


class StoppedOnPurpose(TrainError):
    """The workers stopped together with a message (a NaN loss, a damaged file): retrying
    would fail the same way, so Ray Train does not retry."""


def fit(loop, cfg: Config, run_dir: Path, name: str, extra: dict | None = None,
        callbacks: list | None = None):
    """Run `loop` in a TorchTrainer; re-running the same run_dir resumes from its checkpoint.

    `callbacks` are Ray Train callbacks, e.g. Tune's TuneReportCallback inside a sweep trial.
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayworld import storage
    from rayworld.train.rendezvous import torch_config_for

    run_dir = Path(run_dir).resolve()
    extra = dict(extra or {})
    if (run_dir / "data").is_symlink():  # a sweep trial's link to the shared data
        extra["data_link"] = os.readlink(run_dir / "data")
    scaling = ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                            resources_per_worker={"CPU": cfg.ray.cpus_per_worker})
    trainer = TorchTrainer(
        _stop_on_bad_files(loop, name),
        train_loop_config={"cfg": cfg.to_dict(), "run_dir": str(run_dir), **extra},
        scaling_config=scaling,
        torch_config=torch_config_for(cfg.ray.use_gpu),
        run_config=RunConfig(
            name=name, storage_path=storage.remote(run_dir / "checkpoints"),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            callbacks=callbacks or None),
    )
    marker = stop_marker(run_dir, name)
    marker.unlink(missing_ok=True)
    storage.removed(marker)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainError(_root_message(e, name)) from None
    storage.refresh(marker)  # a worker on another node leaves it in the bucket
    if marker.exists():  # the workers stopped on purpose; retrying would not help
        msg = marker.read_text().strip()
        marker.unlink()
        storage.removed(marker)
        raise StoppedOnPurpose(msg)
    return result


def _stop_on_bad_files(loop, name: str):
    """The train function, but a damaged file met outside the batch loop (validation, a
    checkpoint) ends a one-worker run with the file's one-line message instead of a worker
    traceback and retries. With several workers it raises: returning would leave the other
    ranks waiting in an all-reduce."""

    def run(config: dict):
        import ray.train

        from rayworld.data import ShardError
        from rayworld.io import atomic_write_text

        try:
            return loop(config)
        except (ShardError, CheckpointError) as e:
            if ray.train.get_context().get_world_size() > 1:
                raise
            atomic_write_text(stop_marker(Path(config["run_dir"]), name), f"{name}: {e}")

    return run


def guard(batches, name: str):
    """(batch, None) per batch; a damaged shard ends it with one (None, message). The loop
    hands the message to stop_all_ranks, so every rank stops at the same step."""
    from rayworld.data import ShardError

    try:
        for batch in batches:
            yield batch, None
    except ShardError as e:
        yield None, f"{name}: {e}"


def stop_marker(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / "checkpoints" / f"{name}.stopped"


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


def load_stepper(stepper, state: dict, log_stage: str | None):
    """Restore optimiser moments; a checkpoint with other lr groups keeps only the weights."""
    try:
        stepper.load_state_dict(state)
    except (ValueError, KeyError) as e:
        if log_stage:
            say(f"{log_stage}: optimiser state not restored ({e}); moments start fresh")


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


def nonfinite(losses: dict, stage: str, epoch: int, step: int, run_dir: Path) -> str | None:
    """A one-line message if any loss is NaN or Inf, else None."""
    for key, value in losses.items():
        v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if not math.isfinite(v):
            return (f"{stage} {key} became {v} at epoch {epoch + 1} step {step}; training "
                    f"stopped, last good checkpoint kept: {last_checkpoint_dir(run_dir, stage)} "
                    f"(try a lower lr, grad_clip or amp=off)")
    return None


def stop_all_ranks(msg: str | None, run_dir: Path, stage: str, device) -> bool:
    """True on every rank when any rank has a message; that rank leaves it for the driver.

    The ranks stop together (no half-done all-reduce) and return normally, so Ray Train does
    not retry a run that would fail the same way again.
    """
    import torch.distributed as dist

    flag = torch.tensor([0.0 if msg is None else 1.0], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if msg is not None:
        from rayworld.io import atomic_write_text

        atomic_write_text(stop_marker(run_dir, stage), msg)
    return bool(flag.item() > 0)


def allreduce_sum(values: dict[str, float], device) -> dict[str, float]:
    """Sum scalars over DDP ranks (no-op with one worker)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def gather_lists(items: list[int], device, world: int) -> list[list[int]]:
    """Every rank's list of ints, in rank order (all ranks must call this)."""
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [list(items)]
    out = [None] * world
    dist.all_gather_object(out, list(items))
    return out


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


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read; the message names it and the stage to re-run."""


def load_model_file(path: Path, stage: str) -> dict:
    """A checkpoint written by `stage`; missing or unreadable, one line says what to re-run."""
    from rayworld.storage import refresh

    refresh(path)  # a run in object storage: this node's copy of the object
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} not found: run `rayworld {stage}` first")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} is corrupt or truncated ({why}); re-run "
                              f"`rayworld {stage}` (delete the file first)") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds {type(state).__name__}, not a rayworld checkpoint; "
                              f"re-run `rayworld {stage}`")
    return state


def last_checkpoint_dir(run_dir: Path, name: str) -> str:
    """The newest checkpoint Ray Train committed (a killed upload leaves a partial folder)."""
    import json

    from rayworld import storage

    root = Path(run_dir) / "checkpoints" / name
    storage.refresh(root / "checkpoint_manager_snapshot.json")
    try:
        snap = json.loads((root / "checkpoint_manager_snapshot.json").read_text())
        return str(root / snap["latest_checkpoint_result"]["checkpoint_dir_name"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
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
    run_dir = Path(config["run_dir"])
    if config.get("data_link") and not (run_dir / "data").is_symlink():
        # a sweep trial in a bucket, and this worker on another node than the trial
        run_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another rank on this node made it
            (run_dir / "data").symlink_to(config["data_link"], target_is_directory=True)
    # Ray Train sets OMP_NUM_THREADS=1; give torch the CPUs this worker reserved.
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    ctx = ray.train.get_context()
    return (cfg, run_dir, ctx.get_world_rank(), ctx.get_world_size(),
            ray.train.torch.get_device())
