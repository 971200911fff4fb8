"""The pipeline: its stages in order, what each was made from, and which are done or stale.

Every stage records, in `provenance.json` in the run directory, the config keys that shape its
output and the fingerprints of its inputs (the shards, vae.pt, the latents, mdn.pt,
controller.pt). Before a stage runs, `status` compares that record with the config and the
files now:

- done: same keys, same inputs, and the count reached (epochs, generations, episodes);
- resume: same keys, and the config asks for more epochs, generations or episodes. Training
  goes on from its checkpoint, on the inputs as they are now: iterative training works so;
- stale: a key changed, or an input changed while nothing more was asked. The stage's old
  outputs move to `checkpoints/stale/` and it runs from scratch;
- missing: it has never run.

Collect only adds: each episode keeps the policy and seed it was collected with, so a changed
`collect.*` key applies to new episodes (the data's fingerprint changes, and what trained on it
is stale). `ray.*` keys and evolve's real checks do not change what a stage makes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rayworld import storage
from rayworld.config import Config, flat, stage_keys
from rayworld.io import atomic_write_json, file_id, read_json, update_report

STAGES = ("collect", "train-vae", "encode", "train-mdn", "evolve", "evaluate")
PROVENANCE = "provenance.json"

# the stages each one reads
INPUTS = {"collect": (), "train-vae": ("collect",), "encode": ("collect", "train-vae"),
          "train-mdn": ("encode",), "evolve": ("train-vae", "encode", "train-mdn"),
          "evaluate": ("train-vae", "train-mdn", "evolve")}
# the file each stage's next stage reads, and what a stale stage sets aside
CHECKPOINT = {"train-vae": "vae.pt", "train-mdn": "mdn.pt", "evolve": "controller.pt"}
OUTPUTS = {"train-vae": ("vae.pt", "vae"), "train-mdn": ("mdn.pt", "mdn"),
           "evolve": ("controller.pt", "evolve_state.pkl")}


@dataclass
class Status:
    stage: str
    state: str  # done, resume, stale or missing
    why: str = ""

    def __str__(self):
        return f"{self.stage}: {self.state}" + (f" ({self.why})" if self.why else "")


def fingerprint(stage: str, out: Path) -> str | None:
    """What `stage` made, as it is on disk now; None if it has not made it."""
    out = Path(out)
    ckpt = out / "checkpoints"
    try:
        if stage in ("collect", "encode"):
            name = "manifest.json" if stage == "collect" else "series.json"
            shards = read_json(out / "data" / name)
            return None if shards is None else hashlib.sha1(json.dumps(
                [shards.get("info"), shards.get("shards")], sort_keys=True).encode()
            ).hexdigest()[:16]
        if stage in CHECKPOINT:
            return file_id(ckpt / CHECKPOINT[stage])
    except FileNotFoundError:
        return None
    return None  # evaluate: nothing reads what it makes


def count(stage: str, cfg, out: Path) -> tuple[int, int]:
    """(reached, asked) for the stage's count; raises FileNotFoundError when it has none, and
    CheckpointError (a ValueError) when its checkpoint is damaged."""
    from rayworld.data import Manifest
    from rayworld.train.common import load_model_file

    out = Path(out)
    if stage == "collect":
        return len(Manifest.load(out / "data").shards), cfg.collect.episodes
    if stage == "encode":
        series = Manifest.load(out / "data", "series.json")
        return len(series.shards), len(Manifest.load(out / "data").shards)
    if stage == "evaluate":  # it scored the controller that is there now
        scored = read_json(out / "report.json", {}).get("evaluated_generation")
        if scored is None:
            raise FileNotFoundError(out / "report.json")
        state = load_model_file(out / "checkpoints" / "controller.pt", "evolve")
        return int(scored == state["generation"]), 1
    state = load_model_file(out / "checkpoints" / CHECKPOINT[stage], stage)
    asked = {"train-vae": cfg.vae.epochs, "train-mdn": cfg.mdn.epochs,
             "evolve": 0 if cfg.controller.kind == "mpc" else cfg.evolve.generations}[stage]
    return int(state["generation" if stage == "evolve" else "epoch"]), asked


def status(stage: str, cfg, out: Path) -> Status:
    """Whether `stage` is done, can resume, is stale or missing in the run `out`, and why."""
    out = Path(out)
    if stage == "collect" and cfg.source.kind != "env":
        return _import_status(cfg, out)
    try:
        reached, asked = count(stage, cfg, out)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError, EOFError):
        return Status(stage, "missing")
    if stage == "collect":
        from rayworld.data import Manifest

        info = Manifest.load(out / "data").info
        if info.get("env_id") != cfg.env.id:  # data is never set aside: say so, run nothing
            return Status(stage, "stale", f"the data is from {info.get('env_id')}, env.id is "
                                          f"{cfg.env.id}; use another --out")
    record = read_json(out / PROVENANCE, {}).get(stage)
    if stage == "encode" and record is None:  # encode checks its VAE itself
        record = {"keys": {}, "inputs": {}}
    if record is None:  # a run from before provenance: counts only
        if stage == "evolve":  # and the controller's kind, which its checkpoint records
            import torch

            kind = torch.load(out / "checkpoints" / CHECKPOINT[stage],
                              weights_only=True).get("kind", "linear")
            if kind != cfg.controller.kind:
                return Status(stage, "stale", f"controller.pt holds a {kind} controller, "
                                              f"controller.kind is {cfg.controller.kind}")
        state = "done" if reached >= asked else "resume"
        return Status(stage, state, "no provenance record: counts only")
    # a key added to rayworld after the record was written, or one that did not apply then
    # (plan.* before controller.kind mpc), had its default then
    now, every = stage_keys(stage, cfg), flat(cfg)
    was = {**flat(Config()), **record["keys"]}
    changed = [f"{k} changed ({was.get(k)!r} -> {v!r})" for k, v in now.items() if was.get(k) != v]
    changed += [f"{k} was set ({record['keys'][k]!r}), now it is not"
                for k in record["keys"] if k not in every]
    if changed:
        return Status(stage, "stale", "; ".join(changed))
    moved = [i for i, fp in record["inputs"].items() if fingerprint(i, out) != fp]
    if stage == "encode":  # an encoding belongs to one VAE (its id is the VAE's fingerprint)
        vae = fingerprint("train-vae", out)
        if vae is None:
            return Status(stage, "missing")
        series = read_json(out / "data" / "series.json", {})
        moved = [] if series.get("info", {}).get("vae") == vae else ["train-vae"]
    if reached < asked:
        more = f"{reached} of {asked}" + (f", on changed {', '.join(moved)}" if moved else "")
        return Status(stage, "resume", more)
    if moved and reached > asked:  # a later round of --iterations made it: a re-run of an
        return Status(stage, "done", f"{reached} of {asked}: ahead of this round")  # early one
    if moved:
        return Status(stage, "stale", f"{', '.join(moved)} changed since it ran")
    return Status(stage, "done", record.get("note", ""))


def statuses(cfg, out: Path) -> dict[str, Status]:
    """Every stage's status, where a stage whose inputs will run again is stale too."""
    found: dict[str, Status] = {}
    for stage in STAGES:
        st = status(stage, cfg, out)
        redo = [i for i in INPUTS[stage] if found[i].state != "done"]
        if redo and st.state == "done":
            st = Status(stage, "stale", f"{', '.join(redo)} will run first")
        found[stage] = st
    return found


def _import_status(cfg, out: Path) -> Status:
    from rayworld.data import Manifest
    from rayworld.sources import import_complete

    try:
        done = import_complete(cfg, Manifest.load(out / "data"))
    except (FileNotFoundError, KeyError, ValueError):
        return Status("collect", "missing")
    return Status("collect", "done" if done else "resume", f"imported from {cfg.source.kind}")


def record(stage: str, cfg, out: Path, note: str = ""):
    """Write down what `stage` was just made from (`note`: how, when it is not plain)."""
    out = Path(out)
    prov = read_json(out / PROVENANCE, {})
    prov[stage] = {"keys": stage_keys(stage, cfg),
                   "inputs": {i: fingerprint(i, out) for i in INPUTS[stage]},
                   "output": fingerprint(stage, out),
                   "at": time.strftime("%Y-%m-%d %H:%M:%S"), **({"note": note} if note else {})}
    atomic_write_json(out / PROVENANCE, prov)


def forget(stage: str, out: Path):
    """Drop a stage's record: what it makes from here on is new (a stale stage set aside)."""
    prov = read_json(Path(out) / PROVENANCE, {})
    if prov.pop(stage, None) is not None:
        atomic_write_json(Path(out) / PROVENANCE, prov)


def set_aside(stage: str, out: Path) -> Path | None:
    """Move a stale stage's outputs to checkpoints/stale/<stage>-<time>/ (nothing is deleted)."""
    ckpt = Path(out) / "checkpoints"
    found = [ckpt / name for name in OUTPUTS.get(stage, ()) if (ckpt / name).exists()]
    if not found:
        return None
    stamp = f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest = ckpt / "stale" / stamp
    n = 1
    while dest.exists():  # twice in one second
        n += 1
        dest = ckpt / "stale" / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for path in found:
        shutil.move(str(path), str(dest / path.name))
        storage.committed(dest / path.name)  # a run in object storage moves there too
        storage.removed(path)
    return dest


def upstream(stage: str) -> list[str]:
    """Every stage `stage` depends on, nearest last."""
    seen: list[str] = []
    for i in INPUTS[stage]:
        for u in [*upstream(i), i]:
            if u not in seen:
                seen.append(u)
    return seen


def iteration_config(cfg, it: int):
    """Iteration `it` (from 0) of iterative training: more episodes, epochs and generations.

    Counts grow with the iteration, so every stage resumes from where the last one stopped:
    new episodes come from the evolved controller, the models train on with all data, and
    CMA-ES goes on from its last state in the new world model.
    """
    if it == 0:
        return cfg
    c = copy.deepcopy(cfg)
    c.collect.episodes *= it + 1
    c.collect.policy = "controller"
    c.vae.epochs *= it + 1
    c.mdn.epochs *= it + 1
    c.evolve.generations *= it + 1
    return c


def collect_stage(cfg, run_dir: Path, log=print) -> dict:
    """The collect stage: roll out the env, or import the dataset `source` names."""
    if cfg.source.kind != "env":
        from rayworld.sources import import_source

        return import_source(cfg, Path(run_dir), log)
    from rayworld.collect import collect

    return collect(cfg, Path(run_dir), log)


def first_round(cfg, out: Path, iterations: int) -> int:
    """Where a re-run of `--iterations N` picks up: the last round whose collection began.

    Earlier rounds are done, and their stages must not be judged against the data a later
    round has already added (a VAE trained for round 1's epochs would look stale).
    """
    from rayworld.data import Manifest

    try:
        have = len(Manifest.load(Path(out) / "data").shards)
    except (FileNotFoundError, ValueError):
        return 0
    return max([it for it in range(1, iterations)
                if have > iteration_config(cfg, it - 1).collect.episodes], default=0)


def run_stage(stage: str, cfg, out: Path, note: str = "", **kwargs) -> dict:
    """Run one stage and record its figures and provenance."""
    from rayworld.encode import encode
    from rayworld.evaluate import evaluate
    from rayworld.evolve import evolve
    from rayworld.train.mdn import train_mdn
    from rayworld.train.vae import train_vae

    fn = {"collect": collect_stage, "train-vae": train_vae, "encode": encode,
          "train-mdn": train_mdn, "evolve": evolve, "evaluate": evaluate}[stage]
    figures = fn(cfg, out, **kwargs)
    if stage not in ("train-vae", "train-mdn", "evolve"):  # those log every epoch themselves
        from rayworld.track import Tracker

        tracker = Tracker.open(cfg, out, stage)
        if tracker is not None:
            try:
                tracker.log({f"{stage}/{k}": v for k, v in figures.items()}, 0)
            finally:
                tracker.close()
    wall = figures.pop("wall_s")
    # a figure this run of the stage has not got (None) is dropped: an old one would be stale
    update_report(out, **figures, wall_s={stage: round(wall, 2)})
    record(stage, cfg, out, note)
    return figures


def prepare(stage: str, cfg, out: Path, skip_done: bool, log=print,
            st: Status | None = None) -> bool:
    """The pipeline: whether `stage` runs, said in one line; a stale one is set aside first.
    `st`: its status, when the caller has it already."""
    st = st or status(stage, cfg, out)
    if st.state == "done" and skip_done:
        log(f"rayworld pipeline: {stage} is up to date, skipping it")
        return False
    if st.state == "stale":
        where = set_aside(stage, out)
        forget(stage, out)  # an interrupted re-run then resumes instead of starting over
        log(f"rayworld pipeline: {stage} is stale ({st.why}); running it again"
            + (f", the old outputs are in {where}" if where else ""))
    elif st.state == "resume":
        log(f"rayworld pipeline: {stage} resumes ({st.why})")
    return True


def warn_by_hand(stage: str, cfg, out: Path, log=print) -> str:
    """A stage run by hand does what it is told (it resumes from what is there); one line
    says when that is built on something out of date, or differs from what made it. Returns
    the note its record then carries ("" when there is nothing to say)."""
    found = statuses(cfg, out)
    for u in upstream(stage):
        st = found[u]
        if st.state == "stale":
            log(f"rayworld {stage}: warning: {u} is stale ({st.why}); `rayworld pipeline` "
                "redoes what changed")
            return f"run by hand while {u} was stale"
    st = found[stage]
    if st.state == "stale" and stage in OUTPUTS and "will run first" not in st.why:
        log(f"rayworld {stage}: warning: {st.why}; going on from the checkpoint there, as "
            "asked (`rayworld pipeline` instead would set it aside and start over)")
        return f"resumed by hand after: {st.why}"
    return ""
