"""The `rayworld` command: one subcommand per pipeline stage, all driven by one typed config."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rayworld.config import ConfigError, load_config, save_config
from rayworld.io import update_report

STAGES = ("collect", "train-vae", "encode", "train-mdn")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayworld", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("collect", "roll out envs in Ray actors into Parquet shards"),
                        ("train-vae", "train the ConvVAE with Ray Train"),
                        ("encode", "encode every episode into VAE latents"),
                        ("train-mdn", "train the MDN-RNN with Ray Train"),
                        ("pipeline", "collect, train-vae, encode and train-mdn in turn")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", help="a YAML preset, e.g. tune_configs/quickstart.yaml")
        s.add_argument("--out", required=True, help="the run directory, e.g. runs/quickstart")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config key, e.g. --set vae.lr=3e-4 (repeatable)")
        s.add_argument("--address", default=None,
                       help="join an existing Ray cluster (default: $RAY_ADDRESS, else start "
                            "Ray in-process)")
    return p


def resolve_config(args):
    """Config for this run: a re-run without --config reuses the run's saved config."""
    out = Path(args.out)
    saved = out / "config.yaml"
    base = None
    if args.config is None and saved.exists():
        import yaml

        base = yaml.safe_load(saved.read_text())
    return load_config(args.config, args.set, base=base)


def init_ray(cfg, address: str | None = None):
    """Join a cluster when an address is given, else start Ray in this process."""
    import ray

    if ray.is_initialized():  # e.g. tests, or a notebook that started Ray already
        return False
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    address = address or os.environ.get("RAY_ADDRESS") or cfg.ray.address
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or os.cpu_count(),
                 object_store_memory=cfg.ray.object_store_mb * 1024 * 1024,
                 include_dashboard=cfg.ray.dashboard)
    return True


def run_stage(stage: str, cfg, out: Path) -> dict:
    from rayworld.collect import collect
    from rayworld.encode import encode
    from rayworld.train.mdn import train_mdn
    from rayworld.train.vae import train_vae

    fn = {"collect": collect, "train-vae": train_vae, "encode": encode,
          "train-mdn": train_mdn}[stage]
    figures = fn(cfg, out)
    wall = figures.pop("wall_s")
    update_report(out, **{k: v for k, v in figures.items() if v is not None},
                  wall_s={stage: round(wall, 2)})
    return figures


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"rayworld: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for d in ("data", "checkpoints", "tensorboard", "images"):
        (out / d).mkdir(exist_ok=True)
    save_config(cfg, out / "config.yaml")
    stages = STAGES if args.command == "pipeline" else (args.command,)
    started = init_ray(cfg, args.address)
    try:
        t0 = time.perf_counter()
        for stage in stages:
            run_stage(stage, cfg, out)
        print(f"rayworld {args.command}: done in {time.perf_counter() - t0:.0f} s; "
              f"figures in {out / 'report.json'}")
        return 0
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"rayworld {args.command}: {e}", file=sys.stderr)
        return 1
    finally:
        if started:
            import ray

            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
