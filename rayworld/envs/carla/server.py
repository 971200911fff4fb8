"""Which CARLA server an env talks to, how its client is built, and what a failure looks like."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from rayworld.envs.registry import EnvArgumentError, SimulatorError, check, is_int


class CarlaServerError(SimulatorError):
    """A CARLA server that did not answer in time, or failed; one line naming host:port."""


def server_address(worker_index: int, host, port, port_stride: int, hosts, ports) -> tuple[str, int]:
    """Server `worker_index` of the pool: hosts[i] or host; ports[i], else `port` on listed
    hosts, else port + i * port_stride (several servers on one host)."""
    check("worker_index", worker_index, is_int(worker_index) and worker_index >= 0,
          "an int >= 0")
    for key, items in (("hosts", hosts), ("ports", ports)):
        if items is None:
            continue
        check(key, items, isinstance(items, (list, tuple)) and len(items) > 0, "a non-empty list")
        check(key, items, worker_index < len(items),
              f"at least {worker_index + 1} entries, one per actor (actor {worker_index} has none); "
              "use fewer actors (collect.num_actors) or list more servers")
    if not ports:  # before the sum below, which would turn True into 1
        check("port", port, is_int(port), "a TCP port in 1..65535")
    host = hosts[worker_index] if hosts else host
    port = ports[worker_index] if ports else port if hosts else port + worker_index * port_stride
    key = "hosts" if hosts else "host"
    check(key, host, isinstance(host, str) and host != "", "a host name or IP address")
    check("ports" if ports else "port", port,
          is_int(port) and 0 < port < 65536,
          "a TCP port in 1..65535")
    return host, port


def load_factory(spec):
    """`carla:Client`, `package.module:Attr` or `/path/to/file.py:Attr` (or a callable) -> callable.

    A file path lets Ray workers load a client that is not an installed module (a test double).
    """
    if callable(spec):
        return spec
    check("client_factory", spec, isinstance(spec, str) and ":" in spec,
          "'module:attr' or '/path/to/file.py:attr'")
    where, name = spec.rsplit(":", 1)
    try:
        module = _module_from_file(Path(where)) if where.endswith(".py") else \
            importlib.import_module(where)
        return getattr(module, name)
    except (ImportError, AttributeError, OSError) as e:
        raise EnvArgumentError(f"env.kwargs.client_factory: cannot load {spec!r} ({e}); expected a "
                         "'module:attr' or '/path/to/file.py:attr' that every Ray worker can load") \
            from None


def _module_from_file(path: Path):
    path = path.resolve()
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path:
        return loaded  # the same module object, so its state is shared with whoever imported it
    if loaded is not None:
        name = f"_rayworld_{abs(hash(str(path)))}_{name}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or not path.is_file():
        raise ImportError(f"no Python file at {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def describe(error: Exception, address: str, timeout_s: float) -> str:
    """The client's RuntimeError as one line that names the server and the timeout."""
    text = " ".join(str(error).split())
    if "time-out" in text:
        port = address.rsplit(":", 1)[1]
        return (f"CARLA server {address} did not answer within {timeout_s:g} s (env.kwargs.timeout_s); "
                f"is a server running there, started with -carla-rpc-port={port}? See docs/carla.md")
    return f"CARLA server {address} failed: {text}"
