"""The `rayworld` command: one subcommand per pipeline stage, all driven by one typed config."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from rayworld import storage
from rayworld.config import ConfigError, load_config, save_config
from rayworld.io import update_report
from rayworld.pipeline import STAGES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayworld", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("collect", "roll out envs in Ray actors into Parquet shards"),
                        ("train-vae", "train the ConvVAE with Ray Train"),
                        ("encode", "encode every episode into VAE latents"),
                        ("train-mdn", "train the MDN-RNN with Ray Train"),
                        ("evolve", "evolve the controller with CMA-ES inside the dream"),
                        ("evaluate", "score the controller and the random policy in the real env"),
                        ("dream-gif", "a GIF of one dream rollout beside the same real rollout"),
                        ("diagnose", "open-loop prediction of the world model on held-out "
                                     "episodes: PSNR per horizon, reward and done heads"),
                        ("pipeline", "every stage in turn, skipping those up to date and "
                                     "redoing those a changed key or input made stale"),
                        ("status", "each stage of a run: done, resume, stale or missing, "
                                   "and why")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", help="a YAML preset, e.g. tune_configs/quickstart.yaml")
        if name in ("evaluate", "diagnose", "status"):
            s.add_argument("--run", "--out", dest="out", required=True,
                           help=f"the run directory to {name}")
            if name == "evaluate":
                s.add_argument("--episodes", type=int, default=None,
                               help="real episodes per policy (default: evaluate.episodes)")
        else:
            s.add_argument("--out", required=True, help="the run directory, e.g. runs/quickstart")
        if name == "dream-gif":
            s.add_argument("--steps", type=int, default=200)
            s.add_argument("--seed", type=int, default=0)
        if name == "pipeline":
            s.add_argument("--force", action="store_true",
                           help="run every stage even if it is up to date")
            s.add_argument("--iterations", type=int, default=1,
                           help="N > 1: collect more rollouts with the evolved controller, "
                                "retrain on all data and evolve again, N times in all")
        _common_args(s)
    t = sub.add_parser("tune", help="a Ray Tune sweep from YAML: ASHA over the VAE or MDN-RNN, "
                                    "PBT over CMA-ES runs of the controller")
    t.add_argument("--config", required=True, help="a sweep file, e.g. tune_configs/vae_asha.yaml")
    t.add_argument("--out", required=True, help="the sweep directory; re-run it to resume")
    t.add_argument("--data", default=None,
                   help="a finished run whose data, models and config the trials share "
                        "(default: run the stages the sweep needs in --out)")
    _common_args(t, "override a sweep key (sweep.num_samples=8) or a trial config key")
    r = sub.add_parser("train-rllib", help="train a controller with RLlib (PPO) inside the dream")
    r.add_argument("--run", "--out", dest="out", required=True,
                   help="a run with a trained VAE and MDN-RNN")
    r.add_argument("--config", default=None,
                   help="the algorithm YAML (default: tune_configs/rllib_ppo.yaml)")
    _common_args(r, "override one algorithm key, e.g. --set lr=1e-4")
    return p


def _common_args(s, set_help: str = "override one config key, e.g. --set vae.lr=3e-4"):
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"{set_help} (repeatable)")
    s.add_argument("--address", default=None,
                   help="join an existing Ray cluster (default: $RAY_ADDRESS, else start "
                        "Ray in-process)")
    s.add_argument("--verbose", action="store_true",
                   help="show Ray's own log lines too (always in <out>/logs/ray.log)")
    s.add_argument("--debug", action="store_true",
                   help="on an error, the whole traceback instead of one line")


def resolve_config(args):
    """Config for this run: a re-run without --config reuses the run's saved config."""
    out = Path(args.out)
    saved = out / "config.yaml"
    base = None
    if args.config is None and saved.exists():
        import yaml

        base = yaml.safe_load(saved.read_text())
    return load_config(args.config, args.set, base=base)


LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def local_only():
    """Start an in-process Ray on loopback. With this switch off (Ray's default on macOS and
    Windows), Ray takes 127.0.0.1 as the node's address, and its GCS, raylet, workers and
    agents bind 127.0.0.1 instead of every interface. Ray reads the switch at import and the
    processes it starts inherit it; both are restored afterwards, so a `ray start` launched
    later from this process still makes a cluster."""
    from ray._private import ray_constants

    before, flag = os.environ.get(LOCAL_ONLY), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOCAL_ONLY], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = flag
        if before is None:
            os.environ.pop(LOCAL_ONLY, None)
        else:
            os.environ[LOCAL_ONLY] = before


def init_ray(cfg, address: str | None = None, dashboard: bool | None = None,
             out: Path | None = None, verbose: bool = False):
    """Join a cluster when an address is given, else start Ray in this process. With `out`,
    Ray's own log lines go to out/logs/ray.log (and the console too when verbose)."""
    import ray

    if ray.is_initialized():  # e.g. tests, or a notebook that started Ray already
        return False
    from rayworld import console

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    address = address or os.environ.get("RAY_ADDRESS") or cfg.ray.address
    dashboard = cfg.ray.dashboard if dashboard is None else dashboard
    quiet = out is not None and not verbose
    # configure_logging=False: Ray leaves its logger without a console handler, so what it
    # logs while starting falls through to stderr, which quiet_start sends to the log file
    kw = {"configure_logging": False} if quiet else {}
    with console.quiet_start(out, verbose) if out is not None else contextlib.nullcontext():
        if storage.env_vars():  # workers on every node learn which folders mirror a bucket
            kw["runtime_env"] = {"env_vars": storage.env_vars()}
        if address:
            ctx = ray.init(address=address, **kw)
        else:  # "local": a new Ray even when a `ray start` cluster runs on this machine
            with local_only():  # no dashboard_port: Ray tries 8265 and the next 50 itself
                ctx = ray.init(address="local", num_cpus=cfg.ray.num_cpus or os.cpu_count(),
                               object_store_memory=cfg.ray.object_store_mb * 1024 * 1024,
                               include_dashboard=dashboard, **kw)
    if out is not None:
        console.to_file(out, verbose)
        console.filter_workers(out, verbose)
    if not address and dashboard and ctx.dashboard_url:
        print(f"rayworld: Ray dashboard at http://{ctx.dashboard_url}")
    return True


def _with_ray(args, command: str, cfg, fn, dashboard: bool | None = None) -> int:
    """Run `fn()` with Ray up; a bad config key exits 2, a failed stage 1, each with one line
    (`--debug`: the whole traceback)."""
    out = Path(args.out) if getattr(args, "out", None) else None
    started = False
    try:
        started = init_ray(cfg, args.address, dashboard, out, args.verbose)
        fn()
        return 0
    except ConfigError as e:
        if args.debug:
            raise
        print(f"rayworld: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, ConnectionError) as e:
        if args.debug:
            raise
        print(storage.uris_in(f"rayworld {command}: {e}"), file=sys.stderr)
        if out is not None and (out / "logs" / "ray.log").exists():
            print(f"rayworld {command}: Ray's log is in {storage.remote(out / 'logs' / 'ray.log')}",
                  file=sys.stderr)
        return 1
    finally:
        if started:
            import ray

            ray.shutdown()
            from rayworld import console

            console.restore()
        if out is not None:
            with contextlib.suppress(storage.StorageError):
                storage.publish(out)  # event files, images and logs written in place


def _run_tune(args) -> int:
    from rayworld.sweep import load_sweep, run_sweep

    try:
        sw = load_sweep(args.config, args.set, args.data)
    except ConfigError as e:
        print(f"rayworld: {e}", file=sys.stderr)
        return 2
    data = Path(args.data) if args.data else None
    # Ray Train frees a stopped trial's placement group through the State API (the dashboard).
    return _with_ray(args, "tune", load_config(base=sw.base),
                     lambda: run_sweep(sw, Path(args.out), data), dashboard=True)


def _run_rllib(args) -> int:
    import yaml

    from rayworld.rllib import train_rllib

    out = Path(args.out)
    if not (out / "config.yaml").exists():
        print(f"rayworld train-rllib: {out} is not a run directory (no config.yaml); run "
              f"`rayworld pipeline --out {out}` first", file=sys.stderr)
        return 1
    cfg = load_config(base=yaml.safe_load((out / "config.yaml").read_text()))
    return _with_ray(args, "train-rllib", cfg, lambda: train_rllib(out, args.config, args.set))


def _remote_dir(args) -> str:
    """A run or data directory given as a URI (s3://, gs://, ...) is worked on through its local
    mirror (rayworld.storage); one that cannot be reached is refused before anything is
    written, never turned into a local folder named "s3:". file:///path is a path."""
    for flag in ("out", "data"):
        value = getattr(args, flag, None) or ""
        if value.startswith("file:///"):
            setattr(args, flag, value[len("file://"):])
        elif storage.is_uri(value):
            try:
                setattr(args, flag, str(storage.attach(value)))
            except storage.StorageError as e:
                return str(e)
    return ""


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    remote = _remote_dir(args)
    if remote:  # before anything is written
        print(f"rayworld {args.command}: {remote}", file=sys.stderr)
        return 2
    if args.command == "tune":
        return _run_tune(args)
    if args.command == "train-rllib":
        return _run_rllib(args)
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"rayworld: {e}", file=sys.stderr)
        return 2
    problem = _iterations_problem(getattr(args, "iterations", 1), cfg)
    if problem:  # before anything is written to --out
        print(f"rayworld {args.command}: {problem}", file=sys.stderr)
        return 1
    out = Path(args.out)
    if args.command == "status" and not (out / "config.yaml").exists():
        print(f"rayworld status: {out} is not a run directory (no config.yaml)", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    for d in ("data", "checkpoints", "tensorboard", "images"):
        (out / d).mkdir(exist_ok=True)
    if not (out / "config.yaml").exists():
        save_config(cfg, out / "config.yaml")
    if args.command in ("dream-gif", "diagnose", "status"):  # no Ray needed
        try:
            if args.command == "status":
                _status(cfg, out)
            elif args.command == "dream-gif":
                from rayworld.dreamgif import dream_gif

                dream_gif(cfg, out, args.steps, args.seed)
            else:
                _diagnose(cfg, out)
            storage.publish(out)
            return 0
        except (ValueError, FileNotFoundError, storage.StorageError) as e:
            if args.debug:
                raise
            print(storage.uris_in(f"rayworld {args.command}: {e}"), file=sys.stderr)
            return 1
    return _with_ray(args, args.command, cfg, lambda: _run_stages(args, cfg, out))


def _iterations_problem(iterations: int, cfg) -> str:
    if iterations < 1:
        return f"--iterations {iterations}: expected 1 or more"
    if iterations > 1 and cfg.evolve.generations == 0 and cfg.controller.kind != "mpc":
        # each round resumes CMA-ES for more generations; 0 x N would count as done at once
        return (f"--iterations {iterations} needs evolve.generations > 0 (got 0): each round "
                "evolves the controller further")
    return ""


def _diagnose(cfg, out: Path):
    from rayworld.diagnose import diagnose
    from rayworld.summary import write_summary

    figures = diagnose(cfg, out)
    wall = figures.pop("wall_s")
    update_report(out, **figures, wall_s={"diagnose": round(wall, 2)})
    write_summary(out)


def _status(cfg, out: Path):
    from rayworld.pipeline import statuses

    for st in statuses(cfg, out).values():
        print(st)


def _run_stages(args, cfg, out: Path):
    """One stage, or every stage of the pipeline (N iterations): what is up to date is
    skipped, what a changed key or input made stale is set aside and redone."""
    from rayworld.dreamgif import dream_gif
    from rayworld.pipeline import (
        first_round,
        iteration_config,
        prepare,
        run_stage,
        warn_by_hand,
    )
    from rayworld.summary import write_summary

    stages = STAGES if args.command == "pipeline" else (args.command,)
    t0 = time.perf_counter()
    iterations = getattr(args, "iterations", 1)
    ran = False
    start = first_round(cfg, out, iterations) if args.command == "pipeline" else 0
    if start:
        done = "round 1 is" if start == 1 else f"rounds 1 to {start} are"
        print(f"rayworld pipeline: {done} done; going on with round {start + 1}")
    for it in range(start, iterations):
        step_cfg = iteration_config(cfg, it)
        for stage in stages:
            if it + 1 < iterations and stage == "evaluate":
                continue  # only the last iteration's controller is evaluated
            if not cfg.env.id and stage in ("evolve", "evaluate"):
                if args.command != "pipeline":
                    raise ValueError(f"{stage} needs an env to score controllers in; "
                                     "this run's env.id is empty (data-only source)")
                print(f"rayworld pipeline: no env (env.id is empty), skipping {stage}")
                continue
            storage.refresh(out)  # what workers on other nodes committed to the bucket
            note = ""
            if args.command != "pipeline":
                note = warn_by_hand(stage, step_cfg, out)
            elif not prepare(stage, step_cfg, out, skip_done=not args.force):
                continue
            ran = True
            kwargs = {"episodes": getattr(args, "episodes", None)} \
                if stage == "evaluate" else {}
            run_stage(stage, step_cfg, out, note=note, **kwargs)
            if stage == "evolve":
                dream_gif(step_cfg, out)
            write_summary(out)
            storage.publish(out)
    if args.command == "pipeline" and ran:  # how many rounds made what is there now
        update_report(out, iterations=iterations)
    save_config(cfg, out / "config.yaml")  # a failed run leaves the last good config
    print(f"rayworld {args.command}: done in {time.perf_counter() - t0:.0f} s; "
          f"figures in {storage.remote(out / 'report.json')}")


if __name__ == "__main__":
    sys.exit(main())
