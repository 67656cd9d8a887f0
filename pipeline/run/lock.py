"""The output's lock and whole-object writes.

The lock `_lock.json` names its holder (run, host, process) and the time of its last heartbeat, which
the holder renews while it runs. A new run takes it over at once when the holder is provably gone
(same host, process not alive), else once its heartbeat is older than `stale_after_s`. Every small object
of the output (the lock, manifests, a selection's files) is an `AtomicObject`: written whole.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime

from pipeline.corpus.storage import Location

LOCK_FILE = "_lock.json"  # at the output's root
UNREADABLE_RETRIES, UNREADABLE_WAIT_S = 20, 0.05


class OutputLocked(RuntimeError):
    """Another live run holds the output's lock."""


def _now() -> datetime:
    return datetime.now(UTC)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class Precondition(Exception):
    """A conditional write found the object not as expected (it exists, or changed)."""


class AtomicObject:
    """One small object on a store, always written whole, so a reader never sees half of it: locally
    (and on POSIX shared file systems: NFS, EFS, Lustre) a temporary file linked into place to create
    it and renamed into place to replace it; on S3 one PUT, conditional where asked: `If-None-Match: *`
    to create, `If-Match: <ETag>` to replace or delete only the version read (compare-and-swap).

    `version` identifies what a read saw: the ETag on S3, the file's inode and change time locally.
    Local replace and delete check the version first, then act: a window of a few microseconds
    in which another writer can slip in (no local compare-and-swap exists for rename)."""

    def __init__(self, location: Location):
        self.location = location
        self.local = location.scheme == "file"

    def _temporary(self, data: bytes) -> str:
        temporary = f"{self.location.path}.tmp-{uuid.uuid4().hex[:12]}"
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return temporary

    def _local_version(self) -> str | None:
        try:
            st = os.stat(self.location.path)
        except FileNotFoundError:
            return None
        return f"{st.st_ino}:{st.st_ctime_ns}"

    def read(self) -> tuple[bytes | None, str | None]:
        """(content, version), or (None, None) when there is no object."""
        if self.local:
            try:
                with open(self.location.path, "rb") as f:
                    return f.read(), f"{os.fstat(f.fileno()).st_ino}:{os.fstat(f.fileno()).st_ctime_ns}"
            except FileNotFoundError:
                return None, None
        fs = self.location.fs
        try:  # the version first: a compare-and-swap against it fails if the content read is newer
            version = fs.info(self.location.path, refresh=True)["ETag"]
            return fs.cat_file(self.location.path), version
        except FileNotFoundError:
            return None, None

    def create(self, data: bytes) -> str:
        """Write the object unless it exists (Precondition); return its version."""
        if self.local:
            temporary = self._temporary(data)
            try:
                os.link(temporary, self.location.path)  # atomic, and fails if the name exists
            except FileExistsError as exc:
                raise Precondition("exists") from exc
            finally:
                os.unlink(temporary)
            return self._local_version()
        return self._put(data, mode="create")

    def replace(self, data: bytes, version: str | None = None) -> str:
        """Write the object whole; with `version`, only over that version (Precondition otherwise)."""
        if self.local:
            temporary = self._temporary(data)
            if version is not None and self._local_version() != version:
                os.unlink(temporary)
                raise Precondition("changed")
            os.replace(temporary, self.location.path)
            return self._local_version()
        return self._put(data, **({"IfMatch": version} if version else {}))

    def delete(self, version: str | None = None) -> None:
        """Remove the object; with `version`, only that version (Precondition otherwise)."""
        if self.local:
            if version is not None and self._local_version() != version:
                raise Precondition("changed")
            os.unlink(self.location.path)
            return
        bucket, key = self.location.path.split("/", 1)
        try:
            self.location.fs.call_s3("delete_object", Bucket=bucket, Key=key, **({"IfMatch": version} if version else {}))
        except OSError as exc:
            if _precondition_failed(exc):
                raise Precondition(str(exc)) from exc
            if not version:
                raise
            # An endpoint that rejects conditional deletes: the caller has checked the version just before.
            self.location.fs.call_s3("delete_object", Bucket=bucket, Key=key)
        self.location.fs.invalidate_cache(self.location.path)

    def _put(self, data: bytes, **conditions) -> str:
        try:
            return self.location.fs.pipe_file(self.location.path, data, **conditions)["ETag"]
        except OSError as exc:
            if _precondition_failed(exc):
                raise Precondition(str(exc)) from exc
            raise


def _precondition_failed(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc} {exc.__cause__!r}"
    return any(code in text for code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"))


class OutputLock:
    """The output's lock object, held by this process and renewed by a heartbeat thread.

    Taken atomically (`AtomicObject.create`). A stale lock is taken over by a compare-and-swap on the
    version judged stale (S3), or locally by renaming that version aside and checking it is the one
    judged. Renewal replaces only the version this process wrote last on S3; locally it checks that the
    lock is still this run's, then renames a new one into place. A lock that cannot be parsed (a writer
    outside this protocol caught mid-write) is read again for about a second, then treated as held.
    """

    def __init__(self, root: Location, run_id: str, stale_after_s: float, beat_every_s: float):
        self.location = root.join(LOCK_FILE)
        self.object = AtomicObject(self.location)
        self.root = root
        self.holder = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid()}
        self.stale_after_s = stale_after_s
        self.beat_every_s = beat_every_s
        self.version: str | None = None  # of the lock this process wrote last
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({**self.holder, "beat": _now().isoformat()}).encode()

    def _read(self) -> tuple[dict | None, str | None]:
        """(holder record, version), (None, None) when unlocked; an unparsable lock, once retries run out,
        reads as held by an unknown run with a fresh heartbeat."""
        for _ in range(UNREADABLE_RETRIES):
            data, version = self.object.read()
            if data is None:
                return None, None
            try:
                record = json.loads(data)
                if isinstance(record, dict) and {"run_id", "beat"} <= record.keys():
                    return record, version
            except ValueError:
                pass
            time.sleep(UNREADABLE_WAIT_S)
        return {"run_id": "(unreadable lock)", "host": "unknown", "pid": -1, "beat": _now().isoformat()}, version

    def _why_stale(self, other: dict) -> str | None:
        """Why `other`'s lock may be taken over, or None while its holder may still be running."""
        if other.get("host") == self.holder["host"] and not _process_alive(int(other.get("pid", -1))):
            return f"its process {other.get('pid')} on {other.get('host')} is gone"
        age = (_now() - datetime.fromisoformat(other["beat"])).total_seconds()
        if age > self.stale_after_s:
            return f"its last heartbeat was {age / 60:.1f} min ago"
        return None

    def _take_over(self, other: dict, version: str) -> bool:
        """Replace the stale lock `version`; False when another run changed it first."""
        try:
            if not self.object.local:
                self.version = self.object.replace(self._record(), version)
                return True
            aside = AtomicObject(self.root.join(f"{LOCK_FILE}.stale-{uuid.uuid4().hex[:12]}"))
            if self.object._local_version() != version:
                return False
            os.rename(self.location.path, aside.location.path)
            data, _ = aside.read()
            if data is None or json.loads(data).get("run_id") != other["run_id"]:  # a newer lock was moved: put it back
                try:
                    os.link(aside.location.path, self.location.path)
                except FileExistsError:
                    pass
                os.unlink(aside.location.path)
                return False
            os.unlink(aside.location.path)
            self.version = self.object.create(self._record())
            return True
        except (Precondition, FileNotFoundError, ValueError):
            return False

    def acquire(self) -> str | None:
        """Take the lock; return why an earlier holder's lock was taken over, if it was."""
        self.root.fs.makedirs(self.root.path, exist_ok=True)
        for _ in range(5):  # lose a race for a free or stale lock: look again
            try:
                self.version = self.object.create(self._record())
                taken_over = None
                break
            except Precondition:
                pass
            other, version = self._read()
            if other is None:
                continue
            why = self._why_stale(other)
            if why is None:
                raise OutputLocked(
                    f"run {other['run_id']} (process {other.get('pid')} on {other.get('host')}) holds "
                    f"{self.root.url()}; its last heartbeat was at {other['beat']} (lock {self.location.url()})"
                )
            if self._take_over(other, version):
                taken_over = f"took over the lock of run {other['run_id']}: {why}"
                break
        else:
            raise OutputLocked(f"could not take the lock {self.location.url()}: other runs keep taking it")
        self._thread = threading.Thread(target=self._beat, name="output-lock-heartbeat", daemon=True)
        self._thread.start()
        return taken_over

    def _renew(self) -> bool:
        """Write a new heartbeat over this run's own lock; False once another run has taken it."""
        if self.object.local:
            current, version = self._read()
            if current is None or current.get("run_id") != self.holder["run_id"]:
                return False
        else:
            version = self.version
        try:
            self.version = self.object.replace(self._record(), version)
        except Precondition:
            return False
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_every_s):
            try:
                if not self._renew():
                    return  # taken over: never overwrite another run's lock
            except OSError:  # a store that fails now and then: the next beat tries again
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        current, version = self._read()
        if current is not None and current.get("run_id") == self.holder["run_id"]:
            try:
                self.object.delete(version)
            except (Precondition, FileNotFoundError):
                pass
