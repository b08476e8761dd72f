"""Where a class-image set lives, and its manifest.

The driver is the only writer: actors hand back PNG bytes, so the set can live on the driver's
disk or in any storage the training job can read (an NFS path, `s3://…`, `gs://…`, `file://…`),
with no filesystem shared between the nodes that generate.

Every write is atomic (a temporary name, then a rename), so a crash leaves either the old file or
the new one, never half of one. The manifest records a sha256 per image: on the next run a
missing, truncated or corrupted image fails its checksum and is made again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from raybooth.platform.errors import ConfigError

log = logging.getLogger("raybooth.priors")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SetStore:
    """A folder of files: read, atomic write. Local paths use the OS; URIs use pyarrow.fs."""

    location: str  # what a user reads: a path or a URI

    def read(self, name: str) -> bytes | None:
        raise NotImplementedError

    def write(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def local_path(self, name: str = "") -> Path | None:
        """The file as a local path, when the store is on this machine's filesystem."""
        return None

    def uri(self, name: str = "") -> str:
        raise NotImplementedError

    def lock_path(self) -> Path | None:
        """A lock file beside the set, where the filesystem has one (not object stores)."""
        return None


class LocalStore(SetStore):
    def __init__(self, root: Path):
        self.root = root
        self.location = str(root)

    def _ensure(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"priors.class_data_dir: cannot create {self.root}: {exc.strerror}; choose a "
                "writable folder",
                field="priors.class_data_dir",
            ) from None

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def write(self, name: str, data: bytes) -> None:
        self._ensure()
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.root / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def local_path(self, name: str = "") -> Path:
        return self.root / name if name else self.root

    def uri(self, name: str = "") -> str:
        return self.local_path(name).resolve().as_uri()

    def lock_path(self) -> Path:
        return self.root.parent / f".{self.root.name}.lock"


class ArrowStore(SetStore):
    """Any filesystem pyarrow knows by URI (s3, gs, hdfs, abfs, file)."""

    def __init__(self, fs: Any, base: str, location: str, scheme: str):
        self.fs = fs
        self.base = base.rstrip("/")
        self.location = location.rstrip("/")
        self.scheme = scheme

    def _path(self, name: str) -> str:
        return f"{self.base}/{name}" if name else self.base

    def read(self, name: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self._path(name)) as fh:
                return fh.read()
        except (FileNotFoundError, OSError):
            return None

    def write(self, name: str, data: bytes) -> None:
        self.fs.create_dir(self.base, recursive=True)
        # Object stores publish a PUT all at once; on file-like stores the rename is atomic.
        tmp = self._path(f".{name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        with self.fs.open_output_stream(tmp) as fh:
            fh.write(data)
        self.fs.move(tmp, self._path(name))

    def local_path(self, name: str = "") -> Path | None:
        if self.scheme == "file":
            return Path(self._path(name))
        return None

    def uri(self, name: str = "") -> str:
        return f"{self.location}/{name}" if name else self.location

    def lock_path(self) -> Path | None:
        if self.scheme == "file":
            base = Path(self.base)
            return base.parent / f".{base.name}.lock"
        return None


@contextlib.contextmanager
def set_lock(store: SetStore):
    """Hold the set's lock: a second process asking for the same set (parallel Tune trials, two
    training runs) waits for the first and then finds the images made, instead of making them
    again. Object stores have no locks: there the second process repeats the work, and since the
    bytes are equal and every write is whole, nothing breaks."""
    path = store.lock_path()
    if path is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"priors.class_data_dir: cannot create {path.parent}: {exc.strerror}; choose a writable folder",
            field="priors.class_data_dir",
        ) from None
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is filling %s; waiting for it", store.location)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def open_store(class_data_dir: str, identity: str) -> SetStore:
    """The store of one set: `<class_data_dir>/<identity>/`."""
    if "://" not in class_data_dir:
        return LocalStore(Path(class_data_dir).expanduser() / identity)
    from pyarrow import fs as pafs

    scheme = class_data_dir.split("://", 1)[0].lower()
    try:
        filesystem, base = pafs.FileSystem.from_uri(class_data_dir)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for unknown or unreachable URIs
        raise ConfigError(
            f"priors.class_data_dir {class_data_dir!r} is not a storage location raybooth can "
            f"write: {exc}. Use a local or shared (NFS) path, or a URI like s3://bucket/prefix",
            field="priors.class_data_dir",
        ) from None
    location = f"{class_data_dir.rstrip('/')}/{identity}"
    return ArrowStore(filesystem, str(PurePosixPath(base) / identity), location, scheme)


@dataclass
class Manifest:
    """manifest.json: the set's identity, the inputs that define it, and one entry per image."""

    identity: str
    inputs: dict[str, Any]
    images: dict[int, dict[str, Any]] = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    updated: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "identity": self.identity,
            "inputs": self.inputs,
            "num_images": len(self.images),
            "created": self.created,
            "updated": self.updated,
            "images": {str(i): self.images[i] for i in sorted(self.images)},
        }

    def save(self, store: SetStore) -> None:
        self.updated = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        store.write(MANIFEST, json.dumps(self.to_json(), indent=1, sort_keys=False).encode())


def load_manifest(store: SetStore, identity: str, inputs: dict[str, Any]) -> tuple[Manifest, str | None]:
    """The set's manifest, or a fresh one; the second value says why an existing one was dropped."""
    raw = store.read(MANIFEST)
    fresh = Manifest(identity=identity, inputs=inputs)
    if raw is None:
        return fresh, None
    try:
        data = json.loads(raw)
        if data.get("identity") != identity or data.get("format") != MANIFEST_FORMAT:
            return fresh, "its identity or format does not match this set"
        images = {int(k): dict(v) for k, v in data.get("images", {}).items()}
        if any(not {"file", "sha256"} <= set(v) for v in images.values()):
            return fresh, "an image entry lacks file or sha256"
    except (ValueError, TypeError, AttributeError):
        return fresh, "it is not valid JSON"
    return Manifest(identity=identity, inputs=inputs, images=images,
                    created=data.get("created", fresh.created)), None


def verify(store: SetStore, manifest: Manifest, wanted: range) -> tuple[list[int], list[int], list[int]]:
    """(good, missing, corrupt) indices among `wanted`. Good: present and its bytes match the
    checksum. Corrupt entries are dropped from the manifest so it never vouches for a file it
    cannot back."""
    good, missing, corrupt = [], [], []
    for index in wanted:
        entry = manifest.images.get(index)
        data = store.read(entry["file"]) if entry is not None else None
        if entry is None or data is None:
            missing.append(index)
        elif sha256(data) == entry["sha256"]:
            good.append(index)
            continue
        else:
            corrupt.append(index)
        manifest.images.pop(index, None)
    return good, missing, corrupt
