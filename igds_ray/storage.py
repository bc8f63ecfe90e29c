"""Run-directory storage on local paths, s3:// and gs:// through pyarrow filesystems.

A stage writes into `<dir>/_attempt-<uuid>/`, then moves its files to `<dir>/` and writes
`<dir>/_SUCCESS` (a JSON manifest of the committed files) last. Readers trust only directories
with `_SUCCESS`, so a crash at any point leaves nothing that a reader would count twice. Parquet
readers (pyarrow, pandas, Ray) skip names starting with `_` or `.`, so a finished directory reads
as a plain dataset.

Resuming: an attempt begun with a `fingerprint` (a digest of everything that decides its output)
records it in `_attempt-*/_ATTEMPT.json`. Its parts (`part-*.parquet`) are written atomically
(`write_part`: a local file under a hidden temporary name, then renamed; on an object store one
PUT/multipart upload, which is visible whole or not at all). A rerun with the same fingerprint
keeps that attempt and its finished parts (`begin` returns it, `self.resumed` is set); any other
leftover (another fingerprint, no fingerprint, files outside the attempt) is cleared.

Locking (`DirLock`, `StageDir.lock`): a run or stage directory holds `<dir>/_LOCK`.
- Local paths: an OS `fcntl.flock` on that file, non-blocking. The kernel drops it when the
  holding process exits, however it dies (SIGKILL included), so a crash never leaves a stale lock.
  The file itself is never deleted (deleting a lock file races with a process that just opened it).
  NFS: flock works on NFSv4 (Linux maps it to byte-range locks); where the filesystem refuses
  locks we fall back to the lease below.
- Object stores (s3://, gs://): pyarrow's filesystems have no create-if-absent (conditional) write,
  so the lock is a lease: a JSON object naming its holder (host, pid, start time, a random token)
  and a heartbeat time, rewritten every `stale_after / 4` seconds by a daemon thread. A lease whose
  heartbeat is older than `IGDS_LOCK_STALE_S` (default 300 s) seconds, or whose holder ran on this
  host under a pid that no longer exists, is stale and may be taken over. Taking a lease is
  write-then-read-back after `IGDS_LOCK_SETTLE_S` (default 1 s): two runs starting within that
  window of each other are told apart by the store's last write (S3 and GCS are strongly
  consistent), but the check is best effort, not a consensus protocol: a run whose heartbeats stop
  for longer than the stale time (a frozen VM) can lose its lease to another run; it notices at
  its next heartbeat and refuses to commit (`DirLock.check`). After a crash on an object store,
  a rerun waits for the stale time (or the lease is deleted by hand).
Locks are re-entrant within a process (a pipeline holding `<run>/_LOCK` runs stages that lock their
own directories; locking the same directory twice nests), not between processes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from igds_ray.errors import RunLocked, StageOutputError
from igds_ray.schema import SUCCESS

log = logging.getLogger(__name__)

_STAGE_MARK = "_IGDS_STAGE"  # written when igds creates a directory; it may clear only those
LOCK = "_LOCK"  # the lock file / lease object of a run or stage directory
ATTEMPT = "_ATTEMPT.json"  # inside an attempt: its fingerprint
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
COMMIT_THREADS = 32  # concurrent moves when an attempt is committed
_NEUTRAL = (LOCK,)  # names that do not make a directory "not empty" for the ownership check

LOCK_STALE_ENV = "IGDS_LOCK_STALE_S"
LOCK_SETTLE_ENV = "IGDS_LOCK_SETTLE_S"


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI.

    S3 endpoints other than AWS (MinIO, moto, ...) are taken from `AWS_ENDPOINT_URL` (pyarrow >= 15
    reads it; `AWS_ENDPOINT_URL_S3` too). The filesystem is resolved on the driver and shipped to the
    Ray tasks that read and write (its endpoint travels with it; credentials do not: each worker
    resolves them from its own environment or instance role).
    """
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def path_in(uri: str) -> str:
    """The path `filesystem(uri)` returns, without resolving a filesystem."""
    if "://" in uri:
        return uri.split("://", 1)[1]
    return os.path.abspath(os.path.expanduser(uri))


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def join(uri: str, *parts: str) -> str:
    if "://" in uri:
        return posixpath.join(uri, *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_json(uri: str) -> Any:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def _json_safe(v: Any) -> Any:
    # NaN/inf are not JSON: strict readers (jq, browsers, other languages) reject them.
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _dumps(data: Any) -> bytes:
    return json.dumps(_json_safe(data), indent=2, sort_keys=True, default=str, allow_nan=False).encode()


def write_json_atomic(uri: str, data: Any) -> None:
    """Write through a temporary name and move: readers never see half a file (local: atomic rename)."""
    fs, path = filesystem(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as f:
        f.write(_dumps(data))
    fs.move(tmp, path)


def _with_scheme(uri: str, path: str) -> str:
    return uri.split("://")[0] + "://" + path if "://" in uri else path


def _now_iso(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


# ---------------------------------------------------------------------------------------------
# parts: atomic Parquet files inside an attempt


def part_name(table: pa.Table, key_columns: tuple[str, str]) -> str:
    """A name that depends only on which rows a part holds (its (file, row) keys), so a retried write
    task rewrites the same part instead of adding a second copy of its rows."""
    h = hashlib.blake2b(digest_size=12)
    files = table.column(key_columns[0]).combine_chunks()
    enc = files.dictionary_encode()
    h.update("\x00".join(map(str, enc.dictionary.to_pylist())).encode())
    h.update(enc.indices.to_numpy(zero_copy_only=False).astype("int64").tobytes())
    h.update(table.column(key_columns[1]).to_numpy().astype("int64").tobytes())
    return f"{PART_PREFIX}{h.hexdigest()}{PART_SUFFIX}"


def write_part(fs: pafs.FileSystem, dir_path: str, name: str, table: pa.Table) -> str:
    """Write one Parquet part so that it appears whole or not at all; returns its path."""
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return write_whole(fs, dir_path, name, buf.getvalue())


def write_whole(fs: pafs.FileSystem, dir_path: str, name: str, data: Any) -> str:  # noqa: ANN401
    """Write `data` (bytes or a pyarrow Buffer) to `dir_path/name` so that it appears whole or not at all."""
    final = posixpath.join(dir_path, name)
    if is_local(fs):
        tmp = posixpath.join(dir_path, f".{name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, final)  # atomic on one POSIX filesystem
    else:
        # The bytes are complete before the upload starts: an object store makes the object visible
        # only when its (single or multipart) upload completes, so a crash leaves no half part.
        with fs.open_output_stream(final) as f:
            f.write(data)
    return final


def _internal(name: str) -> bool:
    """Bookkeeping of an attempt, never committed: its fingerprint and half-written temporaries."""
    return name == ATTEMPT or (name.startswith(".") and name.endswith(".tmp"))


def list_parts(fs: pafs.FileSystem, dir_path: str) -> list[str]:
    """Finished parts of an attempt (paths), sorted."""
    info = fs.get_file_info(pafs.FileSelector(dir_path, allow_not_found=True))
    return sorted(
        e.path for e in info
        if e.type == pafs.FileType.File and posixpath.basename(e.path).startswith(PART_PREFIX)
        and e.path.endswith(PART_SUFFIX)
    )


# ---------------------------------------------------------------------------------------------
# locks


def _holder(what: str, token: str) -> dict[str, Any]:
    t = time.time()
    return {"what": what, "host": socket.gethostname(), "pid": os.getpid(), "started_at": _now_iso(t),
            "started_unix": t, "token": token}


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "an unknown holder"
    s = f"{holder.get('what') or 'a run'} on host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, " \
        f"started {holder.get('started_at', '?')}"
    if "heartbeat_unix" in holder:
        age = time.time() - float(holder["heartbeat_unix"])
        s += f", last heartbeat {age:.0f} s ago"
    return s


def _pid_gone(holder: dict[str, Any]) -> bool:
    """The holder ran on this host and its process no longer exists."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False


@dataclass
class _Held:
    count: int
    fd: int | None = None  # local flock
    token: str = ""
    beat: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    lost: str | None = None  # why the lease was lost (object stores)


_held: dict[str, _Held] = {}
_held_mu = threading.RLock()


class DirLock:
    """An exclusive lock on a run or stage directory (see the module docstring); a context manager.

    `acquire` raises `RunLocked` at once, naming the directory and the holder, if another process
    holds it. Re-entrant within one process.
    """

    def __init__(self, dir_uri: str, what: str = "igds run") -> None:
        self.uri = dir_uri
        self.what = what
        self.fs, self.path = filesystem(dir_uri)
        self.lock_path = posixpath.join(self.path, LOCK)
        self.key = f"{type(self.fs).__name__}:{posixpath.normpath(self.lock_path)}"
        self.stale_after = float(os.environ.get(LOCK_STALE_ENV, "300"))
        self.settle = float(os.environ.get(LOCK_SETTLE_ENV, "1.0"))

    @property
    def lock_uri(self) -> str:
        return join(self.uri, LOCK)

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _refuse(self, holder: dict[str, Any] | None, extra: str = "") -> RunLocked:
        return RunLocked(
            f"{self.uri} is locked by {_describe(holder)} ({self.lock_uri}): another run is writing this "
            f"directory; wait for it to finish or point this run elsewhere{extra}"
        )

    def acquire(self) -> "DirLock":
        with _held_mu:
            held = _held.get(self.key)
            if held is not None:
                held.count += 1
                return self
            if is_local(self.fs):
                held = self._acquire_local()
            else:
                held = self._acquire_lease()
            _held[self.key] = held
        return self

    # -- local: flock

    def _acquire_local(self) -> _Held:
        import fcntl

        os.makedirs(self.path, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                try:
                    holder = json.loads(os.pread(fd, 65536, 0).decode() or "null")
                except (OSError, ValueError):
                    holder = None
                os.close(fd)
                raise self._refuse(holder) from None
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                log.warning("%s: this filesystem refuses flock (%s); using a lease file instead", self.uri, e)
                return self._acquire_lease()
            raise
        token = uuid.uuid4().hex
        data = _dumps(_holder(self.what, token))
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        return _Held(count=1, fd=fd, token=token)

    # -- object stores: lease

    def _read_lease(self) -> tuple[dict[str, Any] | None, bool]:
        """(lease, exists)."""
        info = self.fs.get_file_info(self.lock_path)
        if info.type == pafs.FileType.NotFound:
            return None, False
        try:
            with self.fs.open_input_stream(self.lock_path) as f:
                lease = json.loads(f.read().decode())
            return (lease if isinstance(lease, dict) else None), True
        except (OSError, ValueError):
            # Unreadable: judge by the object's age.
            if info.mtime is not None and time.time() - info.mtime.timestamp() > self.stale_after:
                return {"heartbeat_unix": info.mtime.timestamp(), "stale_after_s": self.stale_after}, True
            return None, True

    def _stale(self, lease: dict[str, Any]) -> bool:
        try:
            age = time.time() - float(lease["heartbeat_unix"])
        except (KeyError, TypeError, ValueError):
            return False
        return age > float(lease.get("stale_after_s") or self.stale_after) or _pid_gone(lease)

    def _write_lease(self, lease: dict[str, Any]) -> None:
        with self.fs.open_output_stream(self.lock_path) as f:
            f.write(_dumps(lease))

    def _acquire_lease(self) -> _Held:
        lease, found = self._read_lease()
        if found and (lease is None or not self._stale(lease)):
            raise self._refuse(lease, f"; a lease older than {self.stale_after:.0f} s is taken over "
                                      f"({LOCK_STALE_ENV})")
        if found:
            log.warning("%s: taking over a stale lock of %s", self.uri, _describe(lease))
        token = uuid.uuid4().hex
        mine = dict(_holder(self.what, token), heartbeat_unix=time.time(), stale_after_s=self.stale_after)
        self._write_lease(mine)
        time.sleep(self.settle)
        back, _ = self._read_lease()
        if not back or back.get("token") != token:
            raise self._refuse(back, " (it took the lock at the same moment as this run)")
        held = _Held(count=1, token=token)
        held.beat = threading.Thread(target=self._heartbeat, args=(held, mine), daemon=True,
                                     name=f"igds-lock-{self.path}")
        held.beat.start()
        return held

    def _heartbeat(self, held: _Held, lease: dict[str, Any]) -> None:
        interval = max(0.2, self.stale_after / 4)
        while not held.stop.wait(interval):
            try:
                back, _ = self._read_lease()
                if not back or back.get("token") != held.token:
                    held.lost = f"the lease was taken over by {_describe(back)}"
                    log.error("%s: lost the lock: %s", self.uri, held.lost)
                    return
                self._write_lease(dict(lease, heartbeat_unix=time.time()))
            except Exception as e:  # noqa: BLE001 - a failed beat is retried; staleness is the judge
                log.warning("%s: lock heartbeat failed (%s)", self.uri, e)

    # -- both

    def check(self) -> None:
        """Raise if this process no longer holds the lock (an object-store lease taken over)."""
        with _held_mu:
            held = _held.get(self.key)
        if held is None:
            raise RunLocked(f"{self.uri}: this run does not hold the lock {self.lock_uri}")
        if held.lost:
            raise RunLocked(f"{self.uri}: this run lost its lock ({held.lost}); not committing")
        if held.fd is None:
            back, _ = self._read_lease()
            if not back or back.get("token") != held.token:
                raise RunLocked(f"{self.uri}: this run lost its lock to {_describe(back)}; not committing")

    def release(self) -> None:
        with _held_mu:
            held = _held.get(self.key)
            if held is None:
                return
            held.count -= 1
            if held.count > 0:
                return
            del _held[self.key]
        if held.fd is not None:
            import fcntl

            # The file stays: deleting it would let a process that opened it just before lock an
            # orphan inode while a third creates a fresh file.
            try:
                fcntl.flock(held.fd, fcntl.LOCK_UN)
            finally:
                os.close(held.fd)
            return
        held.stop.set()
        if held.beat is not None:
            held.beat.join(timeout=30)
        try:
            back, _ = self._read_lease()
            if back and back.get("token") == held.token:
                self.fs.delete_file(self.lock_path)
        except Exception as e:  # noqa: BLE001
            log.warning("%s: could not remove the lease %s (%s); it goes stale after %.0f s",
                        self.uri, self.lock_uri, e, self.stale_after)


def lock(dir_uri: str, what: str = "igds run") -> DirLock:
    """`with lock(dir): ...` holds `<dir>/_LOCK` for the block (see `DirLock`)."""
    return DirLock(dir_uri, what)


# ---------------------------------------------------------------------------------------------
# stage directories


@dataclass
class StageDir:
    """One stage's output directory and its commit protocol."""

    uri: str

    def __post_init__(self) -> None:
        self.fs, self.path = filesystem(self.uri)
        self.resumed = False  # set by `begin`: the returned attempt was kept from an earlier run

    @property
    def success_uri(self) -> str:
        return join(self.uri, SUCCESS)

    def done(self) -> bool:
        return self.fs.get_file_info(posixpath.join(self.path, SUCCESS)).type == pafs.FileType.File

    def manifest(self) -> dict[str, Any]:
        if not self.done():
            raise StageOutputError(
                f"{self.uri} is not a finished stage directory (no {SUCCESS}): run the stage that writes it first"
            )
        return read_json(self.success_uri)

    def files(self) -> list[str]:
        """Committed files, as full URIs/paths."""
        return [join(self.uri, name) for name in self.manifest()["files"]]

    def lock(self, what: str = "igds stage") -> DirLock:
        return DirLock(self.uri, what)

    def check_ours(self) -> None:
        """Refuse (before anything is written there) a file, or a non-empty directory igds did not create."""
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.File:
            raise StageOutputError(f"{self.uri} is a file; a stage needs a directory there")
        if info.type == pafs.FileType.Directory:
            names = {posixpath.basename(e.path) for e in self.fs.get_file_info(pafs.FileSelector(self.path))}
            if names - set(_NEUTRAL) and _STAGE_MARK not in names:
                raise StageOutputError(
                    f"{self.uri} is not empty and was not written by igds: refusing to clear it; choose another output"
                )

    def _attempt_fingerprint(self, attempt_path: str) -> str | None:
        try:
            with self.fs.open_input_stream(posixpath.join(attempt_path, ATTEMPT)) as f:
                return json.loads(f.read().decode()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return None

    def begin(self, overwrite: bool = False, fingerprint: str | None = None) -> str | None:
        """Prepare an attempt; returns its staging path, or None if the stage is already finished.

        With a `fingerprint`, an unfinished attempt begun with the same one is kept with its finished
        parts (`self.resumed` is then True); everything else in the directory is cleared.
        """
        self.resumed = False
        if self.done() and not overwrite:
            return None
        self.check_ours()
        keep = None
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.Directory:
            entries = self.fs.get_file_info(pafs.FileSelector(self.path))
            if fingerprint is not None and not overwrite:
                for e in sorted(entries, key=lambda e: e.path):
                    if (e.type == pafs.FileType.Directory and posixpath.basename(e.path).startswith("_attempt-")
                            and self._attempt_fingerprint(e.path) == fingerprint):
                        keep = e.path
                        break
            # Leftovers of an unfinished (or, with overwrite, a finished) attempt. `_SUCCESS` goes first,
            # so an interrupted clear never leaves a "finished" directory with files missing.
            order = sorted(entries, key=lambda e: posixpath.basename(e.path) != SUCCESS)
            for e in order:
                name = posixpath.basename(e.path)
                if name in _NEUTRAL or e.path == keep:
                    continue
                if e.type == pafs.FileType.Directory:
                    self.fs.delete_dir(e.path)
                else:
                    self.fs.delete_file(e.path)
        self.fs.create_dir(self.path, recursive=True)
        with self.fs.open_output_stream(posixpath.join(self.path, _STAGE_MARK)) as f:
            f.write(b"written by igds-ray; this directory may be cleared and rewritten by igds\n")
        return self._open_attempt(keep, fingerprint)

    def _open_attempt(self, keep: str | None, fingerprint: str | None, **extra: Any) -> str:
        """The kept attempt (its half-written temporaries removed; `self.resumed`), or a new one recording
        `fingerprint` (and `extra`)."""
        if keep is not None:
            # Half-written temporaries of the interrupted run (hidden names) are not parts.
            for e in self.fs.get_file_info(pafs.FileSelector(keep)):
                name = posixpath.basename(e.path)
                if e.type == pafs.FileType.File and name.startswith(".") and name.endswith(".tmp"):
                    self.fs.delete_file(e.path)
            self.resumed = True
            return _with_scheme(self.uri, keep)
        staging = posixpath.join(self.path, f"_attempt-{uuid.uuid4().hex}")
        self.fs.create_dir(staging, recursive=True)
        if fingerprint is not None:
            with self.fs.open_output_stream(posixpath.join(staging, ATTEMPT)) as f:
                f.write(_dumps({"fingerprint": fingerprint, "begun_at": _now_iso(), **extra}))
        return _with_scheme(self.uri, staging)

    def begin_increment(self, fingerprint: str) -> str:
        """Prepare an attempt that adds to this finished directory (incremental scoring); returns its staging
        path. The committed files and `_SUCCESS` stay; an unfinished increment begun with the same
        `fingerprint` is kept with its parts (`self.resumed`); other attempts, and files no manifest lists
        (left by an increment that crashed while committing), are removed."""
        listed = set(self.manifest()["files"])
        self.resumed = False
        keep = None
        for e in sorted(self.fs.get_file_info(pafs.FileSelector(self.path)), key=lambda e: e.path):
            name = posixpath.basename(e.path)
            if name in _NEUTRAL or name in (SUCCESS, _STAGE_MARK) or name in listed:
                continue
            if e.type == pafs.FileType.Directory:
                if (keep is None and name.startswith("_attempt-")
                        and self._attempt_fingerprint(e.path) == fingerprint):
                    keep = e.path
                else:
                    self.fs.delete_dir(e.path)
            elif not name.startswith("_"):
                self.fs.delete_file(e.path)
        return self._open_attempt(keep, fingerprint, increment=True)

    def commit_increment(self, staging: str, manifest: dict[str, Any], keep: list[str], drop: list[str],
                         tag: str, suffix: str = ".parquet") -> dict[str, Any]:
        """Commit an increment: the staged parts move in beside the committed ones (named `<tag>-<part>`, so no
        earlier file is overwritten), the new `_SUCCESS` lists `keep` (committed files reused, not copied)
        and the new parts, and only then are `drop` (committed files no longer listed) deleted. A crash
        before `_SUCCESS` leaves the previous version whole; its moved parts are removed by the next
        `begin_increment`."""
        _, staging_path = filesystem(staging)
        staged = sorted(
            e.path
            for e in self.fs.get_file_info(pafs.FileSelector(staging_path, recursive=True))
            if e.type == pafs.FileType.File and e.path.endswith(suffix) and not _internal(posixpath.basename(e.path))
        )
        names = [f"{tag}-" + posixpath.relpath(src, staging_path).replace("/", "__") for src in staged]
        with ThreadPoolExecutor(max_workers=COMMIT_THREADS) as ex:
            list(ex.map(lambda a: self.fs.move(a[0], posixpath.join(self.path, a[1])), zip(staged, names)))
        manifest = dict(manifest, files=list(keep) + names, committed_at=_now_iso())
        write_json_atomic(self.success_uri, manifest)
        with ThreadPoolExecutor(max_workers=COMMIT_THREADS) as ex:
            list(ex.map(lambda n: self.fs.delete_file(posixpath.join(self.path, n)), drop))
        self.fs.delete_dir(staging_path)
        return manifest

    def commit(self, staging: str, manifest: dict[str, Any], suffix: str = ".parquet") -> dict[str, Any]:
        """Move the attempt's files into place, then write `_SUCCESS` last."""
        _, staging_path = filesystem(staging)
        staged = sorted(
            e.path
            for e in self.fs.get_file_info(pafs.FileSelector(staging_path, recursive=True))
            if e.type == pafs.FileType.File and e.path.endswith(suffix) and not _internal(posixpath.basename(e.path))
        )
        names = [posixpath.relpath(src, staging_path).replace("/", "__") for src in staged]
        # In parallel: on an object store a move is a copy and a delete, so 100k parts one at a time
        # would take hours. A crash midway leaves no `_SUCCESS`; the rerun clears and starts again.
        with ThreadPoolExecutor(max_workers=COMMIT_THREADS) as ex:
            list(ex.map(lambda a: self.fs.move(a[0], posixpath.join(self.path, a[1])), zip(staged, names)))
        self.fs.delete_dir(staging_path)
        manifest = dict(manifest, files=names, committed_at=_now_iso())
        write_json_atomic(self.success_uri, manifest)
        return manifest
