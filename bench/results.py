"""Write docs/results.md from run directories: each figure with the command and seed that made it.

    python bench/results.py runs/quickstart-s0 runs/quickstart-s1 ... [--out docs/results.md]

Runs are grouped by preset (the config's `name`) and by the keys they set beyond the preset
(`--set`), so a variant is its own row. Each run's command is rebuilt from its saved
config.yaml against the preset's, and its figures are read from its report.json. Where a group
holds three or more seeds, the median and range of the real return are given; a group with
fewer seeds is marked as such. Nothing here is typed by hand.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayworld.config import flat, load_config  # noqa: E402

# keys that place the work or only watch it: not part of what a run means
OPERATIONAL = ("ray.", "track.", "collect.num_actors", "evolve.num_actors",
               "evolve.gpus_per_actor", "name")


@functools.cache
def preset_for(name: str) -> Path | None:
    for path in sorted((ROOT / "tune_configs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if data.get("name") == name and "sweep" not in data:
            return path
    return None


def command(run: Path, cfg, report: dict) -> tuple[str, dict]:
    """The command that makes this run, and the keys it sets beyond its preset."""
    preset = preset_for(cfg.name)
    if preset is None:  # not a preset of this checkout: the run's own config is the command
        sets = {}
    else:
        base = flat(load_config(preset))
        sets = {k: v for k, v in flat(cfg).items()
                if base.get(k) != v and k != "seed" and not k.startswith(OPERATIONAL)}
    parts = ["rayworld pipeline", f"--config {preset.relative_to(ROOT)}" if preset else
             f"--config {run / 'config.yaml'}"]
    parts.append(f"--out runs/{cfg.name}-{cfg.seed}")
    # counts grow with each round of --iterations, so a run records how many it made
    iterations = report.get("iterations") or (
        round(report["generations"] / cfg.evolve.generations)
        if report.get("generations") and cfg.evolve.generations else 1)
    if iterations > 1:
        parts.append(f"--iterations {iterations}")
    parts += [f"--set {shlex.quote(f'{k}={_yaml(v)}')}" for k, v in sorted(sets.items())]
    parts.append(f"--set seed={cfg.seed}")
    return " ".join(parts), sets


def _yaml(v) -> str:
    text = yaml.safe_dump(v, default_flow_style=True).strip()
    return text.removesuffix("\n...").strip()


def _fmt(x, digits=2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def table(runs: list[Path]) -> str:
    groups: dict[tuple, list] = {}
    for run in runs:
        cfg = load_config(run / "config.yaml")
        report = json.loads((run / "report.json").read_text())
        cmd, sets = command(run, cfg, report)
        key = (cfg.name, json.dumps(sets, sort_keys=True))
        groups.setdefault(key, []).append((cfg.seed, cmd, report))
    out = []
    for (name, sets), members in sorted(groups.items()):
        members.sort(key=lambda m: m[0])
        label = name + ("" if sets == "{}" else " with " + ", ".join(
            f"`{k}={_yaml(v)}`" for k, v in json.loads(sets).items()))
        out.append(f"## {label}\n")
        out.append("| seed | command | real return (mean +/- std, se) | episodes | random | "
                   "dream return, final | wall time |")
        out.append("| --- | --- | --- | --- | --- | --- | --- |")
        returns = []
        for seed, cmd, r in members:
            real = r.get("real_return_mean")
            if real is not None:
                returns.append(real)
            wall = sum((r.get("wall_s") or {}).values())
            out.append(
                f"| {seed} | `{cmd}` | {_fmt(real)} +/- {_fmt(r.get('real_return_std'))} "
                f"(se {_fmt(r.get('real_return_se'))}) | {r.get('episodes', 'n/a')} | "
                f"{_fmt(r.get('random_return_mean'))} | {_fmt(r.get('dream_return_final'))} | "
                f"{wall / 60:.1f} min |")
        if len(returns) >= 3:
            out.append(f"\nMedian **{statistics.median(returns):.2f}**, range "
                       f"{min(returns):.2f} to {max(returns):.2f}, over {len(returns)} seeds.\n")
        else:
            out.append(f"\n{len(returns)} seed(s) only: not a result to quote.\n")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished run directories")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "report.json").exists()]
    if missing:
        print(f"results: no report.json in {', '.join(missing)}", file=sys.stderr)
        return 1
    text = ("# Results\n\nWritten by `python bench/results.py` from the run directories "
            "named below; do not edit by hand. The real return is over `evaluate.episodes` "
            "episodes on seeds 100000 and up, the same for the controller and for random "
            "play. Wall time is the sum of the stages this run directory ran (a variant made "
            "from a copy of another run counts only the stages it ran again), on the machine "
            "that ran them.\n\n"
            + table(args.runs) + "\n")
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(f"results: {len(args.runs)} runs -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
