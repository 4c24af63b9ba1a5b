"""Run storage without a shared disk: any URI that pyarrow.fs opens (s3://, gs://, abfs://, hdfs://).

With `--storage URI`, a run's folder lives at URI/<name> (a search's at URI/<name>, each trial's at
URI/<name>/trials/<trial>). Every node trains in a local staging folder (STAGING under its own temp dir) and copies
what changed to the storage after every epoch (`StorageSyncHook`, rank 0); a run that starts again, on any node
(after a failure, a PBT exploit or --resume), first makes its copy afresh from the storage (`stage`). Ray writes its own
checkpoints and Tune its experiment state straight to the same URI. Credentials and endpoints come from the usual
places of each filesystem (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ~/.aws), on every node.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyseg.engine.run_files import LAST_CHECKPOINT, WEIGHTS_DIR
from pyseg.engine.trainer import Hook, Trainer
from pyseg.errors import ConfigError

STAGING = "pyseg-staging"  # under each node's temp dir
OBJECT_STORES = ("s3", "gs", "gcs")  # flat key spaces: no folders to make, one filesystem per bucket
# the environment an object store's filesystem reads when opened
FILESYSTEM_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST",
)  # fmt: skip
SKIPPED_ON_UPLOAD = ("ray_train",)  # Ray Train writes its checkpoints to the storage itself


@functools.lru_cache(maxsize=32)
def _object_store(bucket_uri: str, credentials: tuple):
    """The pyarrow filesystem of an object store's bucket (scheme://bucket?query), opened once per process and
    environment (credentials: the values of FILESYSTEM_ENV it was opened with)."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(bucket_uri)[0]


def is_remote(uri: str | None) -> bool:
    """True for a URI with a scheme other than file:// (a local path is not remote)."""
    return bool(uri) and "://" in uri and not uri.startswith("file://")


@dataclass(frozen=True)
class Storage:
    """A folder on a pyarrow filesystem, named by its URI (query parameters such as ?endpoint_override=... kept)."""

    uri: str

    @classmethod
    def open(cls, uri: str, flag: str = "--storage") -> Storage:
        """The Storage at uri, checked by listing it; ConfigError naming the flag when pyarrow cannot reach it."""
        storage = cls(uri.rstrip("/") if "?" not in uri else uri)
        try:
            storage.exists()
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for a bad URI or a dead endpoint
            raise ConfigError(
                f"{flag} {uri}: cannot open it ({type(error).__name__}: {str(error).splitlines()[0][:300]}); give a "
                "URI pyarrow.fs understands (s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, abfs://...), with its "
                "credentials set on every node (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)"
            ) from error
        return storage

    def child(self, *parts: str) -> Storage:
        """The Storage of a subfolder (parts joined with /)."""
        base, _, query = self.uri.partition("?")
        joined = "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])
        return Storage(f"{joined}?{query}" if query else joined)

    @property
    def display(self) -> str:
        """The URI without its query parameters (what a user opens)."""
        return self.uri.partition("?")[0]

    def _fs(self):
        """(pyarrow filesystem, path in it). Object stores (s3://, gs://) share one filesystem per bucket and query
        in this process: opening one costs a request (S3 asks for the bucket's region)."""
        import pyarrow.fs

        base, _, query = self.uri.partition("?")
        scheme, _, rest = base.partition("://")
        if scheme not in OBJECT_STORES:
            return pyarrow.fs.FileSystem.from_uri(self.uri)
        bucket, _, key = rest.partition("/")
        credentials = tuple(os.environ.get(key) for key in FILESYSTEM_ENV)  # a changed endpoint opens a new one
        fs = _object_store(f"{scheme}://{bucket}" + (f"?{query}" if query else ""), credentials)
        return fs, f"{bucket}/{key}".rstrip("/")

    def exists(self, *parts: str) -> bool:
        import pyarrow.fs

        fs, path = self.child(*parts)._fs()
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def is_empty_or_missing(self) -> bool:
        import pyarrow.fs

        fs, path = self._fs()
        if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
            return True
        return not fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=False))

    def files(self) -> dict[str, int]:
        """Every file below this folder: {relative path: size in bytes} ({} when it does not exist)."""
        import pyarrow.fs

        fs, path = self._fs()
        if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
            return {}
        selector = pyarrow.fs.FileSelector(path, recursive=True)
        return {
            info.path[len(path) :].lstrip("/"): info.size
            for info in fs.get_file_info(selector)
            if info.type == pyarrow.fs.FileType.File
        }

    def read_bytes(self, *parts: str) -> bytes:
        fs, path = self.child(*parts)._fs()
        with fs.open_input_stream(path) as stream:
            return stream.read()

    def write_file(self, local: Path, *parts: str) -> None:
        """Copies the local file to this folder's parts (object stores replace an object whole)."""
        import pyarrow.fs

        target = self.child(*parts)
        fs, path = target._fs()
        if target.uri.partition("://")[0] not in OBJECT_STORES:  # an object store's keys need no parent folders
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pyarrow.fs.copy_files(str(local), path, destination_filesystem=fs)

    def delete(self, *parts: str) -> None:
        """Removes a file or folder below this one; nothing when it is not there."""
        import pyarrow.fs

        fs, path = self.child(*parts)._fs()
        kind = fs.get_file_info(path).type
        if kind == pyarrow.fs.FileType.Directory:
            fs.delete_dir(path)
        elif kind == pyarrow.fs.FileType.File:
            fs.delete_file(path)

    def download(self, local: Path, skip: tuple[str, ...] = SKIPPED_ON_UPLOAD) -> int:
        """Copies every file of this folder into local (made if missing), except those below a folder named in
        skip; returns how many files it copied (0 when the folder does not exist)."""
        copied = 0
        for relative in self.files():
            if any(part in skip for part in relative.split("/")[:-1]):
                continue
            self.download_file(local / relative, relative)
            copied += 1
        return copied

    def download_file(self, target: Path, *parts: str) -> None:
        """Copies the file at parts (this folder itself when none) to target, replacing it whole."""
        import pyarrow.fs

        fs, path = self.child(*parts)._fs()
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.part")  # ranks of one node may race
        pyarrow.fs.copy_files(path, str(partial), source_filesystem=fs)
        os.replace(partial, target)


class FolderUploader:
    """Copies the files of a local folder that changed since the last call (size or mtime) to a Storage."""

    def __init__(self, local: Path, storage: Storage):
        self.local, self.storage = local, storage
        self.sent: dict[str, tuple[int, int]] = {}

    def upload_changes(self) -> int:
        """Uploads new and changed files (not SKIPPED_ON_UPLOAD, not temporary .part/.tmp files); returns how
        many."""
        count = 0
        if not self.local.is_dir():
            return 0
        for file in sorted(self.local.rglob("*")):
            relative = file.relative_to(self.local).as_posix()
            if not file.is_file() or relative.split("/", 1)[0] in SKIPPED_ON_UPLOAD or file.name.startswith("."):
                continue
            stat = file.stat()
            stamp = (stat.st_size, stat.st_mtime_ns)
            if self.sent.get(relative) == stamp:
                continue
            self.storage.write_file(file, relative)
            self.sent[relative] = stamp
            count += 1
        return count


class StorageSyncHook(Hook):
    """Rank 0 copies its run folder's new and changed files to the storage after every epoch and at the end of the
    fit (after the results, checkpoint and plot hooks, before the epoch is reported to Ray)."""

    def __init__(self, storage_uri: str):
        self.storage = Storage(storage_uri)
        self.uploader: FolderUploader | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.is_main:
            self.uploader = FolderUploader(trainer.run_dir, self.storage)
            self.uploader.upload_changes()  # args.yaml, and the MLflow run id of a resumed run

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        if self.uploader is not None:
            self.uploader.upload_changes()

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.uploader is not None:
            self.uploader.upload_changes()


def staging_root() -> Path:
    """This node's local folder for runs kept on a remote storage (under its temp dir)."""
    return Path(tempfile.gettempdir()) / STAGING


def staging_folder(storage_uri: str, rank: int = 0) -> Path:
    """The folder on this node in which a rank stages its copy of runs kept under storage_uri (each rank its own:
    ranks of one node never race on one copy)."""
    return staging_root() / hashlib.sha1(storage_uri.encode()).hexdigest()[:12] / f"rank{rank}"


def stage(storage_uri: str, run_dir: Path) -> None:
    """Makes run_dir (a staging copy) exactly what the storage holds, less Ray's checkpoints; nothing when the
    stored run has no weights/last.pt (results without a checkpoint cannot be continued: the run starts over and
    its rows are written again)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    Storage(storage_uri).download(run_dir)
    if not (run_dir / WEIGHTS_DIR / LAST_CHECKPOINT).is_file():
        shutil.rmtree(run_dir, ignore_errors=True)


def remove_all_staged(storage_uris: Sequence[str]) -> None:
    """Removes every rank's staging copy of each run kept at storage_uris from this node (the storage holds them;
    a trial stopped or killed mid-run leaves its copy behind)."""
    for uri in storage_uris:
        shutil.rmtree(staging_folder(uri).parent, ignore_errors=True)
    with contextlib.suppress(OSError):
        staging_root().rmdir()


def remove_staged(run_dir: Path) -> None:
    """Removes a staged run folder, and the staging folders above it once they are empty."""
    shutil.rmtree(run_dir, ignore_errors=True)
    root = staging_root()
    folder = run_dir.parent
    while folder != root.parent and folder.is_relative_to(root):
        with contextlib.suppress(OSError):
            folder.rmdir()
        folder = folder.parent
