"""One storage layer for everything a job writes under ``output_dir``: a local path, a shared
mount, or an object-store URI (``s3://bucket/prefix``, ``gs://bucket/prefix``).

Filesystems are pyarrow's (``pyarrow.fs``), not fsspec's: Ray Train's
``RunConfig(storage_filesystem=...)`` takes a pyarrow filesystem, pyarrow already comes with
``ray[data]`` with S3 and GCS built in, and ``FileSystem.from_uri`` resolves a URI the way Ray
Train resolves a plain ``storage_path``. fsspec would add s3fs/gcsfs (and aiobotocore) and still
need a ``PyFileSystem(FSSpecHandler(...))`` wrapper to reach Ray Train.

``open_output(output_dir)`` returns an :class:`OutputStore`:

* a **local path or mount**: ``store.local`` IS the output dir. Writes land in place, and
  ``pull`` / ``push`` / ``publish_dir`` copy nothing.
* a **URI**: ``store.local`` is a private working mirror (a new directory under
  ``$RAYAPP_CACHE/mirrors/`` for each store object in each process, created on first use and
  removed by ``close()``). The recipe writes there as it would write locally, and the store uploads.

Endpoint and credentials. pyarrow reads the S3 endpoint from ``AWS_ENDPOINT_URL_S3``, else
``AWS_ENDPOINT_URL`` (boto3 and the aws CLI read the same variables) when the store is
opened. The endpoint then belongs to the filesystem object, so a worker that receives the
pickled store, or ``run_config_kwargs()``, reaches the same server. Credentials are not
pickled: each process gets them from the SDK's own chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, an instance role; for GCS,
``GOOGLE_APPLICATION_CREDENTIALS`` or the metadata server), so every node of a cluster needs
them. Without credentials pyarrow sends unsigned requests. Against moto those requests stored
the chunked-upload framing as the object's bytes, so the test session sets fake credentials
before any Ray process starts. ``STORAGE_EMULATOR_HOST`` (``http://HOST:PORT``, the variable
Google's clients read) sends gs:// to a GCS emulator, without credentials.

What is atomic:

* **A file.** It is written to a temporary name and renamed into place. S3 and GCS make an
  object visible only when its upload completes, so a reader sees the old object or the new
  one, never part of one.
* **A directory published with ``publish_dir``** (model/, adapter/). The store writes
  ``<dir>/.rayapp_incomplete`` first, then every file, then deletes the files the new version
  lacks, then writes the manifest ``<dir>/.rayapp_complete.json`` (file names, sizes and an
  upload id), and removes the incomplete marker last. A directory counts as complete when the
  manifest exists and the marker does not. A crash at any point in between leaves it
  incomplete, and readers (``is_complete``, ``fetch_dir``) refuse it.
  Locally, model/ is saved to a temporary sibling and renamed into place
  (``rayapp.models.io.save_model_atomic``), so a directory that exists is complete.

How a recipe uses it (``store = open_output(cfg.output_dir)`` on the driver; the store pickles):

    start   store.pull("metrics.jsonl", "teacher")         # what a killed run left, into store.local
            RunConfig(name="checkpoints", **store.run_config_kwargs())   # Ray Train checkpoints at the URI
    during  worker rank 0: store.pull("metrics.jsonl") before the loop, append to
            store.local / "metrics.jsonl", store.push("metrics.jsonl") after each checkpoint
    end     save model/ under store.local, then store.publish_dir("model");
            store.write_json("eval.json", ...); store.push("report.html", "plots"); store.close()
    deploy  fetch_dir("s3://bucket/run/model") -> a local directory, downloaded once per content

Ray Train resumes from the checkpoints it registered under ``<output_dir>/checkpoints`` when
``fit()`` runs again with the same ``RunConfig(name=..., storage_path=..., storage_filesystem=...)``;
``ray.train.get_checkpoint()`` then returns the latest one (``tests/integration/test_storage_ray.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rayapp.errors import UserError
from rayapp.fileio import cache_dir

if TYPE_CHECKING:
    import pyarrow.fs

SCHEMES = {"s3": "s3", "gs": "gs", "gcs": "gs"}   # URI scheme -> the one we write back
COMPLETE = ".rayapp_complete.json"                  # manifest written last by publish_dir
INCOMPLETE = ".rayapp_incomplete"                   # written first, removed last
MARKERS = (COMPLETE, INCOMPLETE)
TRANSFER_THREADS = 8


class StorageError(UserError):
    """output_dir cannot be used as asked: the message names the URI and what to set or change."""


def is_uri(output_dir: str | os.PathLike) -> bool:
    """True for a URI (``s3://``, ``gs://``; other schemes are refused by ``open_output``), False
    for a local path or ``file://``."""
    s = os.fspath(output_dir)
    return "://" in s and not s.startswith("file://")


def open_output(output_dir: str | os.PathLike, *, check: bool = True) -> OutputStore:
    """The store for a job's ``output_dir``. A local directory is created. For a URI, ``check``
    makes one listing request now, so a wrong endpoint, bucket or credentials fail before any
    work is done."""
    import pyarrow.fs

    s = os.fspath(output_dir)
    if not is_uri(s):
        path = Path(s.removeprefix("file://")).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return OutputStore(str(path), pyarrow.fs.LocalFileSystem(), str(path))
    uri = _normalize_uri(s)
    try:
        fs, root = _filesystem(uri)
    except (OSError, ValueError) as e:
        raise _explain(e, uri, "opening") from e
    store = OutputStore(uri, fs, root.rstrip("/"))
    if check:
        store.check()
    return store


def fetch_dir(uri_or_path: str | os.PathLike) -> Path:
    """A local directory with the contents of ``uri_or_path``: the path itself when it is local,
    else a cached download (see :meth:`OutputStore.fetch_dir`)."""
    if not is_uri(uri_or_path):
        path = Path(os.fspath(uri_or_path).removeprefix("file://")).expanduser().resolve()
        if not path.is_dir():
            raise StorageError(f"{uri_or_path}: no such directory")
        return path
    return open_output(uri_or_path, check=False).fetch_dir()


def _filesystem(uri: str, gcs_retry_seconds: float | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
    """pyarrow's filesystem and path for a normalized URI. GCS: ``STORAGE_EMULATOR_HOST`` (the
    variable Google's own clients read) points gs:// at an emulator, without credentials; and
    ``gcs_retry_seconds`` bounds how long an unreachable GCS is retried (15 minutes otherwise)."""
    import pyarrow.fs

    if uri.startswith("gs://"):
        if emulator := os.environ.get("STORAGE_EMULATOR_HOST"):
            from datetime import timedelta

            scheme, _, host = emulator.rpartition("://")
            limit = timedelta(seconds=gcs_retry_seconds) if gcs_retry_seconds else None
            fs = pyarrow.fs.GcsFileSystem(anonymous=True, endpoint_override=host.rstrip("/"),
                                          scheme=scheme or "http", retry_time_limit=limit)
            return fs, uri.removeprefix("gs://")
        if gcs_retry_seconds:
            uri = f"{uri}?retry_limit_seconds={gcs_retry_seconds:g}"
    return pyarrow.fs.FileSystem.from_uri(uri)


class OutputStore:
    """``output_dir`` as a pyarrow filesystem plus root path, and a local directory to write in.

    Paths called ``rel`` are relative to output_dir with '/' separators, such as
    ``"model/config.json"``.
    """

    def __init__(self, uri: str, fs: pyarrow.fs.FileSystem, root: str):
        self.uri = uri            # s3://bucket/prefix, or the absolute local path
        self.fs = fs
        self.root = root          # output_dir on ``fs``: "bucket/prefix", or the absolute local path
        self.remote = is_uri(uri)
        self._mirror: Path | None = None if self.remote else Path(root)

    def __repr__(self) -> str:
        return f"OutputStore({self.uri!r}, local={self._mirror})"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.remote:
            state["_mirror"] = None   # each process gets its own working mirror
        return state

    def __setstate__(self, state: dict) -> None:
        # Importing pyarrow.fs registers its S3 finalizer at exit; a process that only unpickled an
        # S3FileSystem (through pyarrow._s3fs) crashed with SIGSEGV at exit without it.
        import pyarrow.fs  # noqa: F401

        self.__dict__.update(state)

    def __enter__(self) -> OutputStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- where things are -------------------------------------------------------------------

    @property
    def local(self) -> Path:
        """The directory recipes write in: the output dir itself, or the private mirror of a URI."""
        if self._mirror is None:
            base = cache_dir() / "mirrors"
            base.mkdir(parents=True, exist_ok=True)
            self._mirror = Path(tempfile.mkdtemp(prefix=_slug(self.uri) + "-", dir=base))
        return self._mirror

    def path(self, rel: str = "") -> Path:
        """``rel`` under :attr:`local`."""
        rel = _rel(rel)
        return self.local / rel if rel else self.local

    def uri_of(self, rel: str = "") -> str:
        """``rel`` as a URI (or an absolute local path), for messages and summaries."""
        rel = _rel(rel)
        return f"{self.uri}/{rel}" if rel else self.uri

    def run_config_kwargs(self) -> dict:
        """``storage_path`` and ``storage_filesystem`` for Ray Train's ``RunConfig``. Checkpoints go
        to ``<output_dir>/<RunConfig.name>``, which is what a second ``fit()`` resumes from."""
        return {"storage_path": self.root, "storage_filesystem": self.fs}

    def close(self) -> None:
        """Remove the working mirror of a URI. Nothing happens for a local output dir."""
        if self.remote and self._mirror is not None:
            shutil.rmtree(self._mirror, ignore_errors=True)
            self._mirror = None

    # ---- reading what is at output_dir ------------------------------------------------------

    def check(self) -> None:
        """One listing of output_dir: raises StorageError when the endpoint cannot be reached, the
        bucket does not exist, or the credentials are refused. A new, empty output_dir passes.
        On GCS the probe gives up after 15 s instead of the client's 15 minutes."""
        import pyarrow.fs

        fs = _filesystem(self.uri, gcs_retry_seconds=15)[0] if self.uri.startswith("gs://") else self.fs
        try:
            with self._errors("listing"):
                fs.get_file_info(pyarrow.fs.FileSelector(self.root))
        except StorageError as e:
            if not _not_found(e.__cause__):
                raise
            if "NOT_FOUND" in str(e.__cause__):   # GCS answers 404 for the bucket itself
                bucket = self.root.split("/")[0]
                raise StorageError(f"output_dir {self.uri}: bucket '{bucket}' does not exist; create it or "
                                   "fix output_dir") from e.__cause__
            # else: output_dir not written yet, fine

    def exists(self, rel: str) -> bool:
        """Whether a file or directory exists at ``rel`` in output_dir."""
        import pyarrow.fs

        with self._errors("checking", rel):
            return self.fs.get_file_info(self._fs_path(rel)).type != pyarrow.fs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self._errors("reading", rel), self.fs.open_input_stream(self._fs_path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    def list(self, rel: str = "") -> list[str]:
        """Files under ``rel`` in output_dir (recursive, relative to ``rel``, sorted), without the
        completeness markers. A missing ``rel`` gives []."""
        return sorted(f for f in self._remote_files(rel) if posixpath.basename(f) not in MARKERS)

    def is_complete(self, rel: str) -> bool:
        """Whether directory ``rel`` was published completely and no newer upload is under way."""
        if not self.remote:
            return self.path(rel).is_dir()
        return self._dir_state(rel)[0] == "complete"

    # ---- writing ----------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> Path:
        """Write ``rel`` atomically into :attr:`local`, then upload it when output_dir is a URI."""
        path = self.path(rel)
        _write_atomic(path, data)
        if self.remote:
            self._upload([_rel(rel)])
        return path

    def write_text(self, rel: str, text: str) -> Path:
        return self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, data) -> Path:
        return self.write_text(rel, json.dumps(data, indent=2, default=str) + "\n")

    def push(self, *rels: str) -> list[str]:
        """Upload files, or every file under directories, from :attr:`local` to output_dir. Each
        file is replaced atomically, and nothing at output_dir is deleted. Use ``publish_dir``
        for a directory that must appear complete or not at all. Returns the files sent (the
        names as given when output_dir is local, where nothing is copied)."""
        if not self.remote:
            return [_rel(r) for r in rels]
        files = []
        for rel in map(_rel, rels):
            src = self.path(rel)
            if src.is_dir():
                files += [posixpath.join(rel, f) for f in _local_files(src)]
            elif src.is_file():
                files.append(rel)
            else:
                raise StorageError(f"cannot upload {self.uri_of(rel)}: {src} does not exist in the working mirror")
        self._upload(files)
        return files

    def publish_dir(self, rel: str) -> str:
        """Replace directory ``rel`` at output_dir with the one in :attr:`local`. Readers see the
        old complete version, then an incomplete one, then the new complete one (see the module
        docstring). Returns its URI."""
        rel = _rel(rel)
        src = self.path(rel)
        files = _local_files(src) if src.is_dir() else []
        if not files:
            raise StorageError(f"cannot publish {self.uri_of(rel)}: {src} is not a directory with files")
        if not self.remote:
            return str(src)
        upload_id = uuid.uuid4().hex
        self._put(posixpath.join(rel, INCOMPLETE), upload_id.encode())
        self._delete([posixpath.join(rel, COMPLETE)])
        self._upload([posixpath.join(rel, f) for f in files])
        stale = set(self._remote_files(rel)) - set(files) - set(MARKERS)
        self._delete([posixpath.join(rel, f) for f in sorted(stale)])
        manifest = {"format": 1, "upload_id": upload_id,
                    "files": {f: (src / f).stat().st_size for f in files}}
        self._put(posixpath.join(rel, COMPLETE), json.dumps(manifest, indent=1).encode())
        self._delete([posixpath.join(rel, INCOMPLETE)])
        return self.uri_of(rel)

    # ---- bringing things here ---------------------------------------------------------------

    def pull(self, *rels: str) -> list[str]:
        """Copy what exists of ``rels`` (files or directories) from output_dir into :attr:`local`,
        replacing local copies, before a job continues. Missing names are skipped. Returns the
        names found (locally, nothing is copied: the output dir is the local directory)."""
        import pyarrow.fs

        found = []
        for rel in map(_rel, rels):
            with self._errors("checking", rel):
                kind = self.fs.get_file_info(self._fs_path(rel)).type
            if kind == pyarrow.fs.FileType.NotFound:
                continue
            found.append(rel)
            if not self.remote:
                continue
            if kind == pyarrow.fs.FileType.File:
                self._download([(rel, self.path(rel))])
            else:
                files = [posixpath.join(rel, f) for f in self.list(rel)]
                self._download([(f, self.path(f)) for f in files])
        return found

    def fetch_dir(self, rel: str = "") -> Path:
        """Directory ``rel`` of output_dir as a local directory. A URI is downloaded once into
        ``$RAYAPP_CACHE/downloads/``, keyed by the URI and its content: the manifest of a
        published directory (a new upload id each time), or every object's size and modification
        time for a directory another tool uploaded. An incomplete directory is refused, and so is
        a download during which the directory changed."""
        rel = _rel(rel)
        if not self.remote:
            path = self.path(rel)
            if not path.is_dir():
                raise StorageError(f"{self.uri_of(rel)}: no such directory")
            return path
        state, stamp = self._dir_state(rel)
        if state == "missing":
            raise StorageError(f"{self.uri_of(rel)}: nothing there (no objects under this prefix)")
        if state == "incomplete":
            raise StorageError(
                f"{self.uri_of(rel)} is incomplete: {INCOMPLETE} is present, so an upload is under way or "
                "was interrupted; wait for the job to finish, or run it again to publish the directory"
            )
        listed = json.loads(stamp)
        sizes = listed["files"] if state == "complete" else {f: size for f, (size, _mtime) in listed.items()}
        uri = self.uri_of(rel)
        base = cache_dir() / "downloads" / f"{_slug(uri)}-{_sha(uri)[:12]}"
        dest = base / _sha(stamp)[:16]
        base.mkdir(parents=True, exist_ok=True)
        from filelock import FileLock

        with FileLock(str(base) + ".lock"):
            if dest.is_dir():
                return dest
            tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=base))
            try:
                self._download([(posixpath.join(rel, f), tmp / f) for f in sizes])
                for f, size in sizes.items():
                    if (got := (tmp / f).stat().st_size) != size:
                        raise StorageError(f"{uri}/{f}: downloaded {got} bytes where {size} were listed; "
                                           "the directory changed while downloading, try again")
                if self._dir_state(rel) != (state, stamp):
                    raise StorageError(f"{uri} changed while it was downloading (a new upload started); try again")
                os.replace(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            for old in base.iterdir():   # earlier versions of this URI
                if old != dest and not old.name.startswith("."):
                    shutil.rmtree(old, ignore_errors=True)
        return dest

    # ---- internals --------------------------------------------------------------------------

    def _fs_path(self, rel: str) -> str:
        rel = _rel(rel)
        return posixpath.join(self.root, rel) if rel else self.root

    @contextmanager
    def _errors(self, action: str, rel: str = ""):
        try:
            yield
        except StorageError:
            raise
        except (OSError, ValueError) as e:   # pyarrow raises OSError for I/O, ArrowInvalid (a ValueError)
            if _not_found(e):
                raise StorageError(f"{self.uri_of(rel)}: not found ({action})") from e
            raise _explain(e, self.uri_of(rel), action) from e

    def _remote_files(self, rel: str) -> list[str]:
        import pyarrow.fs

        base = self._fs_path(rel)
        with self._errors("listing", rel):
            infos = self.fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True))
        return [posixpath.relpath(i.path, base) for i in infos if i.type == pyarrow.fs.FileType.File]

    def _dir_state(self, rel: str) -> tuple[str, str | None]:
        """("complete", manifest) | ("incomplete", None) | ("unmarked", listing) | ("missing", None).
        The second item is the text that keys the download cache."""
        import pyarrow.fs

        with self._errors("checking", rel):
            done, busy = self.fs.get_file_info([self._fs_path(posixpath.join(rel, m)) for m in MARKERS])
        if busy.type != pyarrow.fs.FileType.NotFound:
            return "incomplete", None
        if done.type != pyarrow.fs.FileType.NotFound:
            return "complete", self.read_text(posixpath.join(rel, COMPLETE))
        base = self._fs_path(rel)
        with self._errors("listing", rel):
            infos = self.fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True))
        listing = {posixpath.relpath(i.path, base): [i.size, i.mtime_ns]
                   for i in infos if i.type == pyarrow.fs.FileType.File}
        return ("unmarked", json.dumps(listing, sort_keys=True)) if listing else ("missing", None)

    def _put(self, rel: str, data: bytes) -> None:
        with self._errors("writing", rel), self.fs.open_output_stream(self._fs_path(rel)) as f:
            f.write(data)

    def _delete(self, rels: list[str]) -> None:
        for rel in rels:
            try:
                with self._errors("deleting", rel):
                    self.fs.delete_file(self._fs_path(rel))
            except StorageError as e:
                if not _not_found(e.__cause__):
                    raise

    def _upload(self, rels: list[str]) -> None:
        import pyarrow.fs

        local = pyarrow.fs.LocalFileSystem()

        def one(rel: str) -> None:
            with self._errors("uploading", rel):
                _copy_file(local, str(self.path(rel)), self.fs, self._fs_path(rel))

        _parallel(one, rels)

    def _download(self, pairs: list[tuple[str, Path]]) -> None:
        """(rel at output_dir, local file) pairs; each local file is replaced atomically."""
        import pyarrow.fs

        local = pyarrow.fs.LocalFileSystem()

        def one(pair: tuple[str, Path]) -> None:
            rel, dest = pair
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                with self._errors("downloading", rel):
                    _copy_file(self.fs, self._fs_path(rel), local, str(tmp))
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)

        _parallel(one, pairs)


def _not_found(e: BaseException | None) -> bool:
    """pyarrow's "no such path": FileNotFoundError from S3 and local files; a plain OSError with
    this wording from GCS for a prefix that holds no objects."""
    return isinstance(e, FileNotFoundError) or (isinstance(e, OSError) and str(e).startswith("No such file or directory"))


def _copy_file(src_fs, src: str, dst_fs, dst: str) -> None:
    """Every byte the store moves goes through here (tests count and interrupt it)."""
    import pyarrow.fs

    pyarrow.fs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def _parallel(fn, items: list) -> None:
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(min(TRANSFER_THREADS, len(items))) as pool:
        for _ in pool.map(fn, items):   # re-raises the first error
            pass


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _local_files(root: Path) -> list[str]:
    """Files under ``root``, relative, '/'-separated, sorted; temporary and marker files left out."""
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*")
        if p.is_file() and p.name not in MARKERS and ".tmp-" not in p.name
    )


def _rel(rel: str) -> str:
    rel = str(rel).replace(os.sep, "/").strip("/")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts or str(rel).startswith("/"):
        raise ValueError(f"{rel!r}: give a path inside output_dir without '..'")
    return "/".join(parts)


def _normalize_uri(s: str) -> str:
    scheme, rest = s.split("://", 1)
    if scheme.lower() not in SCHEMES:
        raise StorageError(
            f"output_dir '{s}': scheme '{scheme}://' is not supported; use a local path, a shared "
            "mount, s3://bucket/prefix or gs://bucket/prefix"
        )
    if "?" in rest:
        raise StorageError(
            f"output_dir '{s}': query parameters are not supported; set the endpoint with "
            "AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL) and keep output_dir a plain s3://bucket/prefix"
        )
    if not rest.split("/")[0]:
        raise StorageError(f"output_dir '{s}': no bucket; write {scheme}://BUCKET/PREFIX")
    return f"{SCHEMES[scheme.lower()]}://{rest.rstrip('/')}"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)[-60:].strip("_") or "output"


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


_UNREACHABLE = ("NETWORK_CONNECTION", "curlCode", "Could not resolve", "Could not connect", "UNAVAILABLE")
_NO_BUCKET = ("NO_SUCH_BUCKET", "The specified bucket does not exist")
_DENIED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN",
           "HTTP status 403", "No credentials", "PERMISSION_DENIED", "UNAUTHENTICATED")


def _explain(e: BaseException, uri: str, action: str) -> StorageError:
    """Turn a pyarrow error into one that says which URI failed and what to set."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    bucket = uri.split("://", 1)[-1].split("/")[0]
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        where = f"endpoint {endpoint}" if endpoint else "AWS (no AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL set)"
        if any(k in msg for k in _UNREACHABLE):
            hint = (f"cannot reach {where}; for an S3-compatible server set AWS_ENDPOINT_URL_S3 (or "
                    "AWS_ENDPOINT_URL) to its URL, e.g. http://HOST:9000, and check it is up")
        elif any(k in msg for k in _NO_BUCKET):
            hint = f"bucket '{bucket}' does not exist at {where}; create it or fix output_dir"
        elif any(k in msg for k in _DENIED):
            hint = (f"credentials missing or refused for s3://{bucket}; set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance role) with read and write access; "
                    "on a cluster every node needs them (e.g. rayapp submit --env KEY=VALUE)")
        else:
            hint = f"S3 at {where} failed"
    elif uri.startswith("gs://"):
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if "access token" in msg or any(k in msg for k in _DENIED):
            hint = (f"credentials missing or refused for gs://{bucket}; set GOOGLE_APPLICATION_CREDENTIALS "
                    "to a service-account key with Storage Object Admin on the bucket (or run "
                    "`gcloud auth application-default login`); on a cluster every node needs them. "
                    "Getting a token needs oauth2.googleapis.com or the VM's metadata server")
        elif any(k in msg for k in _UNREACHABLE):
            hint = (f"cannot reach the GCS emulator at STORAGE_EMULATOR_HOST={emulator}; check it is up"
                    if emulator else "cannot reach Google Cloud Storage; check the network")
        else:
            hint = "Google Cloud Storage failed"
    else:
        hint = "local filesystem error"
    return StorageError(f"output_dir {uri}: {action} failed: {hint}\n  ({msg})")
