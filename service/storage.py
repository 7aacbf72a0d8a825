"""Storage locations for run outputs and Ray storage: a local path, or a URI through ``pyarrow.fs``.

A cluster without a shared volume keeps checkpoints and results in object storage (``s3://``,
``gs://``) or on a mount every node sees (``file://``); Ray Train and Tune take the same
locations (``RunConfig(storage_path, storage_filesystem)``). ``Location`` is the one place that
tells the two kinds apart:

- a **local path** (no scheme) behaves exactly as before: resolved to an absolute path, files
  written atomically (temp file + ``os.replace``), Ray given the plain path;
- a **URI** (``file://``, ``s3://``, ``gs://``, ... as ``pyarrow.fs.FileSystem.from_uri`` knows them),
  or a path inside an explicit ``pyarrow.fs.FileSystem``, is read and written through that
  filesystem; files produced locally (checkpoint, metrics, plots) are uploaded with
  ``pyarrow.fs.copy_files``.

Edge layer: only the Ray adapters (``ray_train``, ``tuning``) and the jobs use it.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from . import checkpoint

if TYPE_CHECKING:
    import pyarrow.fs

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str | Path) -> bool:
    """Whether ``location`` names a filesystem by scheme (``file://``, ``s3://``, ...), not a local path."""
    return isinstance(location, str) and bool(_SCHEME.match(location))


def join(base: str | Path, *parts: str) -> str:
    """``base`` with ``parts`` appended: a URI stays a URI (its ``?query`` kept last), a path a path."""
    if not is_uri(base):
        return str(Path(base, *parts))
    head, sep, query = str(base).partition("?")
    return "/".join([head.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def parent(location: str | Path) -> str:
    """The folder above ``location`` (a URI's parent stays a URI; a local path is resolved first)."""
    if not is_uri(location):
        return str(Path(location).expanduser().resolve().parent)
    head, sep, query = str(location).partition("?")
    scheme, rest = head.split("://", 1)
    rest = rest.rstrip("/")
    up = rest.rsplit("/", 1)[0] or "/" if "/" in rest else rest  # a bucket (no "/") is its own parent
    return f"{scheme}://{up}" + sep + query


@dataclass(frozen=True)
class Location:
    """A folder on some filesystem. ``local`` is set for a plain local path (the unchanged fast path)."""

    fs: "pyarrow.fs.FileSystem"
    path: str  # inside ``fs`` (what Ray calls the fs path: no scheme)
    uri: str  # as given (resolved for a local path): for messages, records and return values
    local: Path | None = None

    # ---- navigation ----------------------------------------------------------------------------

    def __truediv__(self, name: str) -> "Location":
        return Location(self.fs, str(PurePosixPath(self.path) / name), join(self.uri, name),
                        None if self.local is None else self.local / name)

    def __str__(self) -> str:
        return self.uri

    def ray_storage(self) -> tuple[str, "pyarrow.fs.FileSystem | None"]:
        """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig``: the plain path when local."""
        return (str(self.local), None) if self.local is not None else (self.path, self.fs)

    # ---- queries -------------------------------------------------------------------------------

    def _info(self):
        return self.fs.get_file_info(self.path)

    def is_file(self) -> bool:
        import pyarrow.fs

        return self.local.is_file() if self.local is not None else self._info().type == pyarrow.fs.FileType.File

    def exists(self) -> bool:
        import pyarrow.fs

        return self.local.exists() if self.local is not None else self._info().type != pyarrow.fs.FileType.NotFound

    def children(self, prefix: str = "") -> list[str]:
        """Names of the entries directly inside this folder that start with ``prefix``, sorted ([] if absent)."""
        if self.local is not None:
            return sorted(p.name for p in self.local.glob(f"{prefix}*")) if self.local.is_dir() else []
        import pyarrow.fs

        if self._info().type != pyarrow.fs.FileType.Directory:
            return []
        found = self.fs.get_file_info(pyarrow.fs.FileSelector(self.path, allow_not_found=True))
        return sorted(n for n in (PurePosixPath(i.path).name for i in found) if n.startswith(prefix))

    # ---- reading and writing -------------------------------------------------------------------

    def read_text(self) -> str:
        if self.local is not None:
            return self.local.read_text()
        with self.fs.open_input_stream(self.path) as f:
            return f.read().decode()

    def write_text(self, text: str) -> None:
        """Write the file whole: atomically on a local disk, one object (never partial) on an object store."""
        if self.local is not None:
            checkpoint.atomic_write_text(self.local, text)
            return
        self.fs.create_dir(str(PurePosixPath(self.path).parent), recursive=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(text.encode())

    def download(self, dst: str | Path) -> Path:
        """A local copy of this file at ``dst`` (the file itself when it is local)."""
        if self.local is not None:
            return self.local
        import pyarrow.fs

        pyarrow.fs.copy_files(self.path, str(dst), source_filesystem=self.fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        return Path(dst)

    def upload(self, folder: str | Path) -> None:
        """Copy the files of the local ``folder`` into this location (each file whole; local: atomically)."""
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
            for f in sorted(Path(folder).iterdir()):
                if f.is_file():
                    checkpoint.atomic_copy(f, self.local / f.name)
            return
        import pyarrow.fs

        self.fs.create_dir(self.path, recursive=True)
        pyarrow.fs.copy_files(str(Path(folder).resolve()), self.path,
                              source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=self.fs)

    def delete_file(self) -> None:
        if self.local is not None:
            self.local.unlink(missing_ok=True)
        elif self.is_file():
            self.fs.delete_file(self.path)


def resolve(location: str | Path | Location, filesystem: "pyarrow.fs.FileSystem | None" = None) -> Location:
    """A ``Location`` for a local path, a URI, or (with ``filesystem``) a path inside that filesystem.

    Raises ``ValueError`` naming the location for a URI whose scheme pyarrow cannot open.
    """
    if isinstance(location, Location):
        return location
    import pyarrow.fs

    if filesystem is not None:
        if is_uri(location):
            raise ValueError(f"storage: {location!r} is a URI; with an explicit filesystem give a path inside it")
        path = str(PurePosixPath(str(location)))
        return Location(filesystem, path, f"{filesystem.type_name}:{path}")
    if is_uri(location):
        import pyarrow

        try:
            fs, path = pyarrow.fs.FileSystem.from_uri(str(location))
        except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as e:
            raise ValueError(f"storage: cannot open {location!r} ({e}); allowed: a local path or a URI such as "
                             "file:///abs/dir, s3://bucket/dir, gs://bucket/dir") from None
        return Location(fs, path, str(location))
    local = Path(location).expanduser().resolve()
    return Location(pyarrow.fs.LocalFileSystem(), local.as_posix(), str(local), local)


class Staging:
    """A local folder whose files end up in ``target``: ``target`` itself when it is local, else a temp
    folder that ``finish`` uploads and ``close`` removes."""

    def __init__(self, target: Location) -> None:
        self.target = target
        self._tmp = None if target.local is not None else tempfile.mkdtemp(prefix="introprior-out-")
        self.dir = target.local if target.local is not None else Path(self._tmp)
        self.dir.mkdir(parents=True, exist_ok=True)

    def finish(self) -> None:
        if self._tmp is not None:
            self.target.upload(self.dir)

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def file_stamps(folder: Path) -> dict[str, tuple[int, int, int]]:
    """The plain files directly in ``folder``, each with (inode, size, modification time in ns): an atomic
    rewrite (a new file renamed over the old) changes the inode even within one tick of a coarse clock."""
    if not folder.is_dir():
        return {}
    return {f.name: (st.st_ino, st.st_size, st.st_mtime_ns) for f in folder.iterdir() if f.is_file()
            for st in (f.stat(),)}


def written_since(folder: Path, before: dict[str, tuple[int, int, int]]) -> list[Path]:
    """The plain files directly in ``folder`` that are new or rewritten since ``before`` (``file_stamps``):
    what a run wrote, not what the folder held already (another run's results, the MLflow store of a run
    started in the same folder)."""
    return [folder / name for name, stamp in sorted(file_stamps(folder).items()) if before.get(name) != stamp]
