"""Every write of the library goes through here: atomic files and directories, paths confined to an
output directory, one-line disk errors, exclusive output locks, content hashes.

The rules (docs/distributed.md, "Reliability"): a file or directory appears complete or not at all;
nothing outside the output directory is written through a symlink; nothing of the user's is deleted
(an output directory is replaced only with --overwrite, and never when it is a root, the home, the
current directory or a git repository); two processes never write the same output directory at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from .errors import CtxDistillError

LOCK_NAME = ".ctxdistill.lock"


# -- paths ------------------------------------------------------------------------------------------


def confined(root: Path, *parts: str) -> Path:
    """`root/parts...`, refusing any path that resolves outside `root` (a symlink pointing away)."""
    base = Path(root).resolve()
    path = base.joinpath(*parts)
    resolved = path.resolve()
    if resolved != base and base not in resolved.parents:
        raise CtxDistillError(f"refusing to write {path}: it resolves to {resolved}, outside the output directory {base}")
    return path


def dangerous_to_delete(path: Path) -> str | None:
    """Why `path` must never be wiped by --overwrite (None when it may be)."""
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "it is a filesystem root"
    if resolved == Path.home().resolve():
        return "it is the home directory"
    if resolved == cwd or resolved in cwd.parents:
        return "it is the current directory or one of its parents"
    if (resolved / ".git").exists():
        return "it holds a git repository"
    return None


def check_writable_location(path: Path, what: str = "--out") -> None:
    """Refuse output locations that can never hold a run: under /proc or /sys, or below a file."""
    resolved = Path(path).expanduser().resolve()
    if resolved.parts[:2] in (("/", "proc"), ("/", "sys"), ("/", "dev")):
        raise CtxDistillError(f"{what} {path} is under {'/'.join(resolved.parts[:2])[1:]}, a kernel filesystem; choose a directory on disk")
    for parent in [resolved, *resolved.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise CtxDistillError(f"{what} {path}: {parent} is a file, not a directory; choose another {what}")
            break


# -- atomic writes ------------------------------------------------------------------------------------


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from Python, or the same error wrapped by safetensors' writer."""
    return getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc) or "os error 28" in str(exc)


def disk_error(what: str, exc: BaseException, keep: str) -> CtxDistillError:
    """One line for a failed write (disk full, read-only, permission): what failed, what is intact, what to do."""
    reason = getattr(exc, "strerror", None) or ("No space left on device" if is_disk_full(exc) else str(exc).splitlines()[0][:200])
    hint = ("free some space, then rerun the same command to resume" if is_disk_full(exc)
            else "fix the cause, then rerun the same command to resume")
    return CtxDistillError(f"cannot write {what}: {reason}; {keep}; {hint}")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` through a hidden temporary file and one rename: it is complete or unchanged."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_json_atomic(path: Path, data, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent, default=str, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: Path, records) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))


def read_json(path: Path, what: str = "file"):
    """JSON from `path`, or one clear error naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CtxDistillError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CtxDistillError(f"{what} {path} is not valid JSON ({type(exc).__name__}); restore or rebuild it") from None


@contextlib.contextmanager
def atomic_directory(final: Path, what: str, keep: str = "nothing else was changed"):
    """Yield a hidden temporary directory next to `final`; on success it replaces `final` in one rename.

    On any failure the temporary directory is removed; an OSError (disk full, read-only) becomes one
    CtxDistillError line naming `what`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error type
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(what, exc, keep) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- output locks ---------------------------------------------------------------------------------------


def lock_holder(directory: Path) -> str | None:
    """The PID holding `directory`'s output lock, or None when no live process holds it (a look, not a lock:
    a process may take it right after; the writer's own `OutputLock` still refuses a second writer)."""
    path = Path(directory) / LOCK_NAME
    if not path.is_file():
        return None
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


class OutputLock:
    """An exclusive lock on an output directory, held for the life of the process (or the `with`).

    `DIR/.ctxdistill.lock` holds the holder's PID; the kernel releases the flock when the process dies,
    so a killed run never leaves a stale lock. A second process gets one error line naming the holder.
    """

    def __init__(self, directory: Path, what: str = "output directory", lock_file: Path | None = None):
        self.directory = Path(directory)
        self.what = what
        self.path = Path(lock_file) if lock_file is not None else self.directory / LOCK_NAME
        self.file = None

    def acquire(self) -> "OutputLock":
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise CtxDistillError(f"{self.what} {self.directory} is in use by process {holder} (lock {path}); wait for it to "
                                      f"finish, or choose another --out") from None
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()  # the holder released (and removed) the file between our open and flock: try again
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.file = handle
        return self

    def release(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.file.close()  # closing releases the flock
            self.file = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def only_lock_inside(directory: Path) -> bool:
    """The directory holds nothing but our own lock file (what a run killed before writing leaves)."""
    return all(p.name == LOCK_NAME for p in Path(directory).iterdir())


# -- hashes ------------------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(examples) -> str:
    """sha256 over what training reads: every prepared example's repr (ids and tokens), in order.

    The one corpus fingerprint: checkpoints (resume) and the teacher cache both key on it."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(repr(ex).encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()
