"""The one storage module: local folders and object stores (`s3://`, `gs://`) through `pyarrow.fs`, the
filesystem layer Ray Train's `storage_filesystem` uses, so every stored path takes the same code.

A location is a local path or a URI. A URI may carry pyarrow's (and Ray's) options as a query, kept when a
path is joined onto it:

    s3://bucket/aigc/runs?endpoint_override=http://127.0.0.1:9000&scheme=http&region=us-east-1

Credentials come from the standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, read by pyarrow's AWS SDK) or from the URI's query; aigc never
writes them anywhere, and every message shows a location through `redact`, which hides a query's keys.

A directory published on an object store (`publish_dir`) becomes visible only when it is complete: its
objects are uploaded and checked against the local files, and only then is the marker object
`_AIGC_COMPLETE` written; readers (`fetch_dir`) refuse a prefix without it. (An object store has no atomic
rename of a prefix, so the marker, written last, is the commit point; removing it first hides the old copy
while a new one replaces it.) Local folders keep the rename of a complete temp sibling.

Imports no Ray, torch or FastAPI: config validation uses it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pyarrow.fs as pafs

MARKER = "_AIGC_COMPLETE"
# scheme -> the package whose filesystem serves it, when pyarrow has none built in
SCHEMES = {"s3": "pyarrow (built with S3)", "gs": "pyarrow (built with GCS)", "gcs": "pyarrow (built with GCS)"}
FSSPEC_PACKAGES = {"abfs": "adlfs", "az": "adlfs", "hdfs": "pyarrow (with libhdfs)", "oss": "ossfs", "r2": "s3fs"}
# query keys that hold secrets: never shown
SECRET_KEYS = ("access_key", "secret_key", "session_token")


class StorageError(RuntimeError):
    """A location that cannot be used: names it (redacted) and the filesystem's error."""


def is_uri(path: str | os.PathLike) -> bool:
    """True for `scheme://...` (an object store); False for a local path (`file://` counts as local)."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def scheme_of(uri: str) -> str:
    return urlsplit(uri).scheme.lower()


def redact(location: str | os.PathLike) -> str:
    """The location as it may be printed: credentials (`s3://KEY:SECRET@bucket/...`, or a secret in the query)
    replaced by ***."""
    s = str(location)
    if not is_uri(s):
        return s
    scheme, rest = s.split("://", 1)
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    s = f"{scheme}://{netloc}{slash}{tail}"
    if "?" not in s:
        return s
    head, query = s.split("?", 1)
    pairs = [(k, "***" if k.lower() in SECRET_KEYS else v) for k, v in parse_qsl(query, keep_blank_values=True)]
    return f"{head}?{urlencode(pairs, safe=':/*')}"


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...`; a URI keeps its query at the end."""
    s = str(base)
    if not is_uri(s):
        return os.path.join(s, *parts)
    head, sep, query = s.partition("?")
    return "/".join([head.rstrip("/"), *(p.strip("/") for p in parts)]) + (sep + query)


def local_path(path: str | os.PathLike) -> str:
    """A local path with `~` and env vars expanded, absolute (`file://` stripped)."""
    s = str(path).removeprefix("file://")
    return os.path.abspath(os.path.expanduser(os.path.expandvars(s)))


def scheme_problem(location: str) -> str | None:
    """Why `location`'s scheme cannot be used here (no filesystem installed for it), or None; offline."""
    if not is_uri(location):
        return None
    scheme = scheme_of(location)
    if scheme in SCHEMES:
        try:
            if scheme == "s3":
                import pyarrow._s3fs  # noqa: F401  (present only when pyarrow was built with S3)
            else:
                import pyarrow._gcsfs  # noqa: F401
        except ImportError:
            return f"{redact(location)}: no {scheme}:// filesystem installed: install {SCHEMES[scheme]}"
        return None
    package = FSSPEC_PACKAGES.get(scheme)
    hint = f"install {package}" if package else "supported: s3://, gs:// or a local folder"
    return f"{redact(location)}: no filesystem for the {scheme}:// scheme ({hint})"


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a local path or a URI; a StorageError naming the location and the error."""
    s = str(location)
    if not is_uri(s):
        return pafs.LocalFileSystem(), local_path(s)
    problem = scheme_problem(s)
    if problem:
        raise StorageError(problem)
    try:
        fs, path = pafs.FileSystem.from_uri(s)
    except Exception as e:
        raise StorageError(f"{redact(s)}: {_clean(e, s)}") from None
    return fs, path.rstrip("/")


def _clean(error: Exception, location: str) -> str:
    """The filesystem's message with any secret it might echo (the URI's, the environment's) replaced by ***."""
    text = str(error)
    secrets = [v for k, v in parse_qsl(urlsplit(location).query) if k.lower() in SECRET_KEYS]
    parts = urlsplit(location)
    secrets += [parts.username or "", parts.password or ""]
    secrets += [os.environ.get(v, "") for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
    for secret in filter(None, secrets):
        text = text.replace(secret, "***")
    return text


def _call(location: str, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"{redact(location)}: {what} failed: {_clean(e, location)}") from None


def check_writable(location: str | os.PathLike) -> None:
    """Create `location` and write, read back and delete a small object under it: what a run does first, on the
    driver, so an unreachable, missing or unauthorised bucket fails before any worker starts."""
    s = str(location)
    fs, path = resolve(s)
    probe = f"{path}/.aigc-write-check-{uuid.uuid4().hex[:8]}"

    def write_read_delete() -> None:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        with fs.open_input_stream(probe) as f:
            f.read()
        fs.delete_file(probe)

    _call(s, "write check", write_read_delete)


def exists(location: str | os.PathLike) -> bool:
    """Whether a file or directory is there (on an object store: an object, or objects under the prefix)."""
    s = str(location)
    fs, path = resolve(s)
    return _call(s, "stat", lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)


def listdir(location: str | os.PathLike) -> list[str]:
    """The names directly under a directory, sorted; [] when it does not exist."""
    s = str(location)
    fs, path = resolve(s)
    infos = _call(s, "list", lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    return sorted(i.base_name for i in infos)


def read_bytes(location: str | os.PathLike) -> bytes:
    s = str(location)
    fs, path = resolve(s)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return _call(s, "read", read)


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """One file written whole: an object PUT is atomic; a local file is written beside and renamed."""
    s = str(location)
    fs, path = resolve(s)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return

    def put() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

    _call(s, "write", put)


def write_text(location: str | os.PathLike, text: str) -> None:
    write_bytes(location, text.encode())


def _local_files(root: str) -> dict[str, int]:
    """Relative path -> size of every file under a local directory."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root).replace(os.sep, "/")] = os.path.getsize(p)
    return out


def _remote_files(fs: pafs.FileSystem, path: str) -> dict[str, int]:
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path[len(path) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def upload_dir(local: str | os.PathLike, location: str | os.PathLike) -> None:
    """Copy a local directory's files to `location` (merged with what is there; same names replaced)."""
    s = str(location)
    fs, path = resolve(s)
    if isinstance(fs, pafs.LocalFileSystem):  # pyarrow's copy does not create a local destination's folders
        _call(s, "upload", lambda: shutil.copytree(local_path(local), path, dirs_exist_ok=True))
        return
    _call(s, "upload", lambda: pafs.copy_files(local_path(local), path, source_filesystem=pafs.LocalFileSystem(),
                                               destination_filesystem=fs))


def push_files(local: str | os.PathLike, location: str | os.PathLike, names: list[str]) -> None:
    """These entries of a local folder, where present, to the same names under `location`: a file copied, a
    folder's files uploaded (merged). Model directories go through `publish_dir` instead."""
    for name in names:
        path = Path(local_path(local)) / name
        if path.is_dir():
            upload_dir(path, join(location, name))
        elif path.is_file():
            write_bytes(join(location, name), path.read_bytes())


def pull_files(location: str | os.PathLike, local: str | os.PathLike, files: list[str],
               dirs: tuple[str, ...] = ()) -> None:
    """These files and folders under `location`, where present, into the same names in the local folder `local`
    (created; a folder replaced whole)."""
    present = set(listdir(location)) if exists(location) else set()
    root = Path(local_path(local))
    root.mkdir(parents=True, exist_ok=True)
    for name in [n for n in files if n in present]:
        (root / name).write_bytes(read_bytes(join(location, name)))
    for name in [n for n in dirs if n in present]:
        shutil.rmtree(root / name, ignore_errors=True)
        download_dir(join(location, name), root / name)


def download_dir(location: str | os.PathLike, local: str | os.PathLike, *, exclude: tuple[str, ...] = ()) -> None:
    """Copy every file under `location` into the local directory `local` (created), but the names in `exclude`
    at its top (sub-directories included)."""
    s = str(location)
    fs, path = resolve(s)
    dest = local_path(local)
    os.makedirs(dest, exist_ok=True)
    for rel in _call(s, "list", lambda: _remote_files(fs, path)):
        if rel.split("/", 1)[0] in exclude:
            continue
        target = os.path.join(dest, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _call(s, "download", lambda rel=rel, target=target: _copy_stream(fs, f"{path}/{rel}", target))


@contextlib.contextmanager
def checkpoint_dir(checkpoint: Any) -> Iterator[str]:
    """A Ray Train checkpoint (anything with `.filesystem` and `.path`) as a local directory: its own folder when
    local, else a private download, removed on exit. Not `Checkpoint.as_directory`: that copy is shared per node
    by checkpoint id, and a reader arriving after the first download has finished downloads again in place, so a
    second reader of one checkpoint (two ranks resuming, best == final exported at once) can read the first's
    files half rewritten."""
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield checkpoint.path
        return
    with tempfile.TemporaryDirectory(prefix="aigc-ckpt-") as tmp:
        _call(str(checkpoint.path), "download", lambda: pafs.copy_files(
            checkpoint.path, tmp, source_filesystem=checkpoint.filesystem,
            destination_filesystem=pafs.LocalFileSystem()))
        yield tmp


def _copy_stream(fs: pafs.FileSystem, src: str, target: str, chunk: int = 1 << 22) -> None:
    with fs.open_input_stream(src) as r, open(target, "wb") as w:
        while block := r.read(chunk):
            w.write(block)


def delete_dir(location: str | os.PathLike) -> None:
    """Remove a directory and everything under it; nothing when it is not there."""
    s = str(location)
    fs, path = resolve(s)
    if exists(s):
        _call(s, "delete", lambda: fs.delete_dir(path))


def publish_dir(local: str | os.PathLike, location: str | os.PathLike) -> str:
    """Make `location` a complete copy of the local directory, visible only once complete (see the module's
    docstring): a local target by renaming a finished temp sibling into place; an object store by hiding the old
    copy (marker removed), uploading, checking every object's size against the local file, and writing the marker
    (the file list with sizes) last. Returns `location`."""
    s, src = str(location), local_path(local)
    files = _local_files(src)
    marker = json.dumps({"files": files}, sort_keys=True).encode()
    if not is_uri(s):
        dest = Path(local_path(s))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
        shutil.copytree(src, tmp)
        (tmp / MARKER).write_bytes(marker)
        old = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.old"
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
        return s
    fs, path = resolve(s)
    _call(s, "unpublish", lambda: fs.get_file_info(f"{path}/{MARKER}").type == pafs.FileType.File
          and fs.delete_file(f"{path}/{MARKER}"))
    delete_dir(s)
    upload_dir(src, s)
    stored = _call(s, "list", lambda: _remote_files(fs, path))
    wrong = sorted(n for n, size in files.items() if stored.get(n) != size)
    if wrong:
        raise StorageError(f"{redact(s)}: upload incomplete, not published: {', '.join(wrong[:5])}")
    write_bytes(join(s, MARKER), marker)
    return s


def publish_dir_once(local: str | os.PathLike, location: str | os.PathLike) -> str:
    """`publish_dir`, unless a complete copy is already published there (a base model, written once per run)."""
    if not exists(join(location, MARKER)):
        publish_dir(local, location)
    return str(location)


def published_files(location: str | os.PathLike) -> dict[str, int]:
    """The file list (relative path -> size) of a published directory; a StorageError when its marker is missing
    (never published, or being replaced right now)."""
    s = str(location)
    marker = join(s, MARKER)
    if not exists(marker):
        raise StorageError(f"{redact(s)}: not a published directory (no {MARKER} marker: incomplete, being "
                           "written, or never published)")
    return json.loads(read_bytes(marker))["files"]


def fetch_dir(location: str | os.PathLike, cache: str | os.PathLike, verify: Callable[[Path], Any]) -> Path:
    """A local copy of a published directory at `cache` (a path naming its content, e.g. by fingerprint): reused
    when there; else downloaded into a temp sibling, checked against the marker's file list, `verify`d (which
    raises on a bad file), and only then renamed into place, so a partial or tampered download is never used."""
    s, dest = str(location), Path(local_path(cache))
    files = published_files(s)
    if dest.is_dir():
        verify(dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        download_dir(s, tmp, exclude=(MARKER,))
        got = _local_files(str(tmp))
        if got != files:
            raise StorageError(f"{redact(s)}: the objects differ from its {MARKER} list (missing, extra or resized: "
                               f"{sorted(set(got.items()) ^ set(files.items()))[:5]})")
        verify(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:  # another replica finished the same copy first: the content is the same
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
