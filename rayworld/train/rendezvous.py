"""How Ray Train's workers find each other, without a port on every interface.

Ray Train's torch backend meets at a TCPStore on the first worker, and torch binds that store to
every interface; it has no setting for one address. When every node of the Ray cluster is on
this machine's loopback (rayworld's in-process Ray, or test clusters), the workers meet through
a file store in the temp directory instead, and gloo and NCCL talk over the loopback device.
A real cluster keeps Ray's own TCP rendezvous.
"""

from __future__ import annotations

import contextlib
import glob
import ipaddress
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass

from ray.train.torch import TorchConfig
from ray.train.torch import config as torch_config

LOOPBACK = "lo0" if sys.platform == "darwin" else "lo"


def all_on_loopback() -> bool:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    try:
        return bool(nodes) and all(ipaddress.ip_address(n["NodeManagerAddress"]).is_loopback
                                   for n in nodes)
    except (KeyError, ValueError):
        return False


def _on_loopback():
    os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", LOOPBACK)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, and another user's
        pass
    return True


def clear_stale(tmp: str) -> list[str]:
    """Removes the rendezvous files of process groups whose starter has died.

    A trial that Tune stops (ASHA at max_t, Ctrl-C) never reaches on_shutdown, so its file stays;
    the starter's pid in the name tells a stale file from one a live run is using.
    """
    gone = []
    for path in glob.glob(os.path.join(tmp, "rw-pg-*-*")):
        pid = os.path.basename(path).split("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(path)
                gone.append(path)
    return gone


class _FileBackend(torch_config._TorchBackend):
    """Ray's torch backend with `file://` rendezvous (all workers share this machine's disk)."""

    path = ""

    def on_start(self, worker_group, backend_config):
        tmp = tempfile.gettempdir()
        clear_stale(tmp)
        self.path = os.path.join(tmp, f"rw-pg-{os.getpid()}-{uuid.uuid4().hex}")
        worker_group.execute(_on_loopback)
        if not isinstance(worker_group, torch_config.V1WorkerGroup):
            worker_group.execute(torch_config._set_torch_distributed_env_vars)
        import ray

        ray.get([worker_group.execute_single_async(
            i, torch_config._setup_torch_process_group, backend=backend_config.backend,
            world_rank=i, world_size=len(worker_group), init_method=f"file://{self.path}",
            timeout_s=backend_config.timeout_s) for i in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config):
        super().on_shutdown(worker_group, backend_config)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


@dataclass
class LoopbackTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return _FileBackend


def torch_config_for(use_gpu: bool) -> TorchConfig:
    backend = "nccl" if use_gpu else "gloo"
    if all_on_loopback():
        return LoopbackTorchConfig(backend=backend)
    return TorchConfig(backend=backend)
