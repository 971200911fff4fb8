"""Run directories in object storage (s3://, gs://, or any filesystem fsspec reaches).

A run given as a URI is worked on through a local mirror: a folder at the same path on every
node (under the temp dir, or $RAYWORLD_MIRROR). The stages read and write plain files there,
as on a local disk. A file committed with `io.atomic_path` is uploaded at once, as one object
that appears whole or not at all; a process reading the run first pulls what it needs. So the
manifest, written after its shards, stays the commit point, and a re-run on any machine pulls
the run and completes what is missing. Ray Train and Tune keep their checkpoints in the bucket
itself (`storage_path`).

Which mirror belongs to which URI travels to Ray's workers in $RAYWORLD_MIRRORS.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

ENV = "RAYWORLD_MIRRORS"
RAY_OWNED = ("vae", "mdn")  # Ray Train's run names under checkpoints/
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+)://")  # 2+ letters: not C://
NATIVE = {"s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"}  # pyarrow's own filesystems
# what to install for fsspec's other filesystems
EXTRAS = {"az": "adlfs", "adl": "adlfs", "oss": "ossfs", "http": "fsspec", "https": "fsspec",
          "memory": "fsspec", "ftp": "fsspec", "sftp": "paramiko", "webdav": "webdav4"}


class StorageError(RuntimeError):
    """A run directory that cannot be reached; the message says which and what to do."""


def is_uri(value) -> bool:
    value = str(value)
    return bool(SCHEME.match(value)) and not value.startswith("file://")


def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for a URI; one clear line when it can't be had."""
    import pyarrow.fs as pafs

    scheme = SCHEME.match(uri).group(1).lower()
    if scheme in NATIVE:
        try:
            return pafs.FileSystem.from_uri(uri)
        except Exception as e:  # ArrowInvalid, OSError: no credentials, a bad bucket name
            raise StorageError(f"{uri}: {_first_line(e)}") from None
    try:
        import fsspec
    except ImportError:
        raise StorageError(f"{uri}: rayworld reaches {scheme}:// through fsspec; pip install "
                           f"'rayworld[fsspec]'") from None
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        pkg = EXTRAS.get(scheme, f"the fsspec filesystem for {scheme}://")
        raise StorageError(f"{uri}: no filesystem for {scheme}:// ({_first_line(e)}); "
                           f"pip install {pkg}") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def mirror_path(uri: str) -> Path:
    """Where a URI's run is mirrored: the same string on every node."""
    root = os.environ.get("RAYWORLD_MIRROR") or os.path.join(tempfile.gettempdir(),
                                                             "rayworld-mirror")
    scheme, rest = uri.split("://", 1)
    return Path(root) / scheme.lower() / rest.strip("/")


class Mirror:
    """A local folder kept in step with a folder in object storage.

    A file counts as in step when its size and mtime equal the object's: a download and an
    upload both set the local mtime to the object's.
    """

    def __init__(self, uri: str, local: Path):
        self.uri, self.local = uri.rstrip("/"), Path(local)
        self.fs, self.root = filesystem(self.uri)
        self.root = self.root.rstrip("/")

    def rel(self, path) -> str:
        """`path` (links resolved) relative to the mirror: "" for the mirror itself."""
        rel = Path(os.path.realpath(path)).relative_to(self.local).as_posix()
        return "" if rel == "." else rel

    def key(self, path: Path) -> str:
        return f"{self.root}/{Path(path).relative_to(self.local).as_posix()}"

    def uri_of(self, path: Path) -> str:
        rel = Path(path).relative_to(self.local).as_posix()
        return self.uri if rel == "." else f"{self.uri}/{rel}"

    def listing(self, under: str = "") -> dict:
        """{relative path: FileInfo} of every object under `under` (relative)."""
        import pyarrow.fs as pafs

        base = f"{self.root}/{under}".rstrip("/")
        try:
            one = self.fs.get_file_info(base)
            if one.type == pafs.FileType.File:
                return {under: one}
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True,
                                                            allow_not_found=True))
        except Exception as e:
            raise StorageError(f"{self.uri}: cannot list ({_first_line(e)})") from None
        return {i.path[len(self.root) + 1:]: i for i in infos
                if i.type == pafs.FileType.File}

    def pull(self, *under: str, only: set | None = None):
        """Download what is missing or differs locally under each relative prefix (all of the
        run when none is given; of those, the relative paths in `only` when given). Each file
        lands whole: a temporary name, then a rename."""
        for prefix in under or ("",):
            asked_ray = _ray_owned(f"{prefix}/.")  # e.g. checkpoints/vae, named on purpose
            for rel, info in self.listing(prefix).items():
                if _hidden(rel) or (_ray_owned(rel) and not asked_ray):
                    continue
                if only is not None and rel not in only:
                    continue
                dest = self.local / rel
                if _same(dest, info):
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp",
                                           dir=dest.parent)
                try:
                    with os.fdopen(fd, "wb") as f, self.fs.open_input_stream(info.path) as src:
                        while chunk := src.read(1 << 22):
                            f.write(chunk)
                    _stamp(tmp, info)
                    os.replace(tmp, dest)
                except BaseException as e:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                    if isinstance(e, Exception):
                        raise StorageError(f"{self.uri_of(dest)}: download failed "
                                           f"({_first_line(e)})") from None
                    raise

    def push(self, path: Path):
        """Upload one local file. S3 and GCS show an object only once it is whole."""
        path = Path(path)
        key = self.key(path)
        try:
            with open(path, "rb") as src, self.fs.open_output_stream(key) as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
            _stamp(path, self.fs.get_file_info(key))
        except Exception as e:
            raise StorageError(f"{self.uri_of(path)}: upload failed ({_first_line(e)})") from None

    def push_tree(self, under: str = "", last: str | None = None):
        """Upload every local file under a relative prefix that differs from its object
        (`last`, a relative path, after all the others)."""
        remote = self.listing(under)
        base = self.local / under
        if not base.exists():
            return
        # not through links: a sweep trial's data/ links to the shared data, uploaded once
        files = [base] if base.is_file() else sorted(
            Path(d) / f for d, _, names in os.walk(base) for f in names
            if not os.path.islink(Path(d) / f))
        files.sort(key=lambda p: p.relative_to(self.local).as_posix() == last)
        for path in files:
            rel = path.relative_to(self.local).as_posix()
            if not _hidden(rel) and not _same(path, remote.get(rel)):
                self.push(path)

    def remove(self, path: Path):
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_file(self.key(path))


def _hidden(rel: str) -> bool:
    """Temporary names of atomic writes; never uploaded, never pulled."""
    return any(part.startswith(".") and part.endswith(".tmp") for part in rel.split("/"))


def _ray_owned(rel: str) -> bool:
    """What Ray Train and Tune keep in the bucket themselves (their storage_path): a whole
    pull leaves it there; Ray reads it from the bucket when it resumes."""
    parts = rel.split("/")
    if parts[0] == "tune":
        return True
    # a run's checkpoints/vae/..., or a sweep trial's (trials/<trial>/checkpoints/vae/...)
    at = 2 if parts[0] == "trials" else 0
    return len(parts) > at + 2 and parts[at] == "checkpoints" and parts[at + 1] in RAY_OWNED


def _same(path: Path, info) -> bool:
    if info is None:
        return False
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return st.st_size == info.size and (info.mtime_ns is None or st.st_mtime_ns == info.mtime_ns)


def _stamp(path, info):
    if info.mtime_ns is not None:
        os.utime(path, ns=(info.mtime_ns, info.mtime_ns))


# --- which local folders mirror which URIs, in this process and in Ray's workers ---

_mirrors: dict[str, Mirror] = {}


def _known() -> dict[str, str]:
    return json.loads(os.environ.get(ENV) or "{}")


def attach(uri: str) -> Path:
    """The local mirror of a run URI, pulled whole; from now on this process (and the Ray
    workers it starts) upload what they commit there."""
    m = Mirror(uri, mirror_path(uri))  # an unreachable scheme fails here, before any mkdir
    m.local.mkdir(parents=True, exist_ok=True)
    local = m.local = m.local.resolve()  # stages resolve their paths (/tmp is a link on macOS)
    _mirrors[str(local)] = m
    os.environ[ENV] = json.dumps({**_known(), str(local): m.uri})
    m.pull()
    return local


def env_vars() -> dict:
    """For ray.init's runtime_env: workers on every node learn the mirrors."""
    return {ENV: os.environ[ENV]} if os.environ.get(ENV) else {}


def mirror_of(path) -> Mirror | None:
    known = _known()
    if not known:  # a local run: nothing to resolve
        return None
    path = os.path.realpath(path)
    for local, uri in known.items():
        if path == local or path.startswith(local + os.sep):
            if local not in _mirrors:
                _mirrors[local] = Mirror(uri, Path(local))
            return _mirrors[local]
    return None


def committed(path):
    """After an atomic write: upload the file if it lies in a mirrored run."""
    m = mirror_of(path)
    if m is not None:
        m.push(Path(os.path.realpath(path)))


def refresh(path, *under: str):
    """Before reading a mirrored run in a worker (or what a worker wrote): pull `under`
    (relative to `path`; all of it when none) from the bucket. A no-op for a local run."""
    m = mirror_of(path)
    if m is None:
        return
    base = m.rel(path)
    m.pull(*[_join(base, u) for u in under] or [base])


def refresh_files(paths):
    """Pull just these files (one listing per folder): a worker's share of the shards."""
    groups: dict = {}
    for p in paths:
        m = mirror_of(p)
        if m is not None:
            rel = m.rel(p)
            groups.setdefault((id(m), rel.rsplit("/", 1)[0] if "/" in rel else ""),
                              (m, set()))[1].add(rel)
    for (_, folder), (m, rels) in groups.items():
        m.pull(folder, only=rels)


def publish(path, *under: str):
    """Upload what changed under `path` (files written in place, like event files)."""
    m = mirror_of(path)
    if m is None:
        return
    base = m.rel(path)
    for u in under or ("",):
        m.push_tree(_join(base, u))


def publish_folder(path, last: str):
    """Upload a folder replaced in place, such as a checkpoint. Its file `last` (the one a
    reader checks for) is taken out of the bucket first and uploaded after the rest, so a
    folder cut off half-way up is never taken for a whole one."""
    m = mirror_of(path)
    if m is None:
        return
    rel = m.rel(path)
    m.remove(Path(os.path.realpath(path)) / last)
    m.push_tree(rel, last=_join(rel, last))


def _join(base: str, under: str) -> str:
    return f"{base}/{under}".strip("/") if base else under.rstrip("/")


def removed(path):
    """A file taken out of a mirrored run (moved aside, replaced by a rename)."""
    m = mirror_of(path)
    if m is not None:
        m.remove(Path(os.path.realpath(path)))


def remote(path) -> str:
    """`path` as the user named it: its URI when it lies in a mirrored run."""
    m = mirror_of(path)
    return m.uri_of(Path(os.path.realpath(path))) if m is not None else str(path)


def uris_in(text: str) -> str:
    """A message with every mirror path in it shown as its URI."""
    for local, uri in _known().items():
        text = text.replace(local, uri.rstrip("/"))
    return text
