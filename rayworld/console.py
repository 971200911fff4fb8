"""What the console shows while a stage runs: rayworld's lines, not Ray's.

Ray's own log records in this process, and every line its workers print that is not one of
rayworld's (Ray Train's "Reporting training result ...", checkpoint notices, core warnings),
go to `<run>/logs/ray.log`. `--verbose` shows them on the console as well.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from pathlib import Path

# what rayworld's workers say: the train loops' epoch, progress and resume lines
OURS = re.compile(r"^(vae|mdn)( epoch \d+/\d+)?: ")
LOG = "logs/ray.log"
_saved: list = []  # the console handlers `to_file` took off the ray logger
_saved_propagate: list = []


@contextlib.contextmanager
def quiet_start(out: Path, verbose: bool):
    """Around ray.init: what it writes to stderr (its start-up warnings) goes to the run's
    log file."""
    path = Path(out) / LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    if verbose:
        yield
        return
    with open(path, "a") as f, contextlib.redirect_stderr(f):
        yield


def to_file(out: Path, verbose: bool) -> Path:
    """After ray.init: the `ray` logger writes to the run's log file (and its console handler
    stays only when verbose)."""
    path = Path(out) / LOG
    logger = logging.getLogger("ray")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if not verbose:
        _saved[:] = [h for h in logger.handlers if not isinstance(h, logging.FileHandler)]
        for h in _saved:
            logger.removeHandler(h)
    logger.addHandler(handler)
    _saved_propagate[:] = [logger.propagate]
    logger.propagate = False  # with no handler of its own, a record would reach stderr
    return path


def filter_workers(out: Path, verbose: bool = False):
    """After ray.init: every worker line goes to the file; rayworld's own lines, Ray's
    scheduling messages (a resource request that cannot be met), and with `verbose` all the
    rest, reach the console too.

    Ray forwards worker output through one dispatcher in its driver (a private module): if
    its shape changes, this leaves Ray's own printing as it is.
    """
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        print_lines = ray_worker.print_to_stdstream
    except (ImportError, AttributeError):
        return
    path = Path(out) / LOG

    def handle(data: dict):
        try:
            lines = data.get("lines") or []
            who = data.get("actor_name") or data.get("task_name") or ""
            with open(path, "a") as f:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                for line in lines:
                    f.write(f"{stamp} ({who} pid={data.get('pid')}) {line}\n")
            if verbose or data.get("pid") in ("autoscaler", "raylet"):
                print_lines(data, ignore_prefix=False)
                return
            ours = [line for line in lines if OURS.match(line)]
            if ours and not data.get("is_err"):
                print_lines({**data, "lines": ours}, ignore_prefix=True)
        except Exception:  # the log file gone, a full disk: print as Ray would, never stop
            print_lines(data, ignore_prefix=False)

    try:
        names = [name for name, _ in dispatcher.handlers]
    except (AttributeError, TypeError, ValueError):
        return
    if "ray_print_logs" in names:
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("rayworld", handle)


def restore():
    """Undo `filter_workers` (tests start and stop Ray many times in one process)."""
    try:
        from ray._private import worker as ray_worker

        ray_worker.global_worker_stdstream_dispatcher.remove_handler("rayworld")
    except (ImportError, AttributeError, KeyError):
        pass
    logger = logging.getLogger("ray")
    for h in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(h)
        h.close()
    for h in _saved:
        logger.addHandler(h)
    _saved.clear()
    if _saved_propagate:
        logger.propagate = _saved_propagate.pop()
    sys.stdout.flush()
