"""Writing outputs: the one atomic writer and the one overwrite guard of the project.

* :func:`atomic_output` yields a temporary path in the destination's directory and renames it
  onto the destination (``os.replace``) only when the block succeeds; on any error the
  temporary file goes and the destination is untouched. :func:`atomic_write_text` is the
  one-call form for text, :func:`replace_dir` the same for a finished directory.
* :func:`refuse_existing` refuses outputs that exist (a file, or a non-empty directory)
  unless ``overwrite``, and an output that is one of the inputs even with ``overwrite``:
  nothing here ever deletes an input.

It depends on nothing else in the package, so every module may use it.
"""
from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


_WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched; a failed
    write (``OSError``: a full or read-only disk) names ``path`` in its message."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno not in _WRITE_FAILURES or str(path) in str(err) or str(tmp) in str(err):
            raise
        raise type(err)(err.errno, f"{path}: {err.strerror or err}") from None  # same class, the file named
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same directory + ``os.replace``."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_tensors(tensors: dict, path: str | os.PathLike) -> None:
    """``safetensors.torch.save_file`` whose failure (a full disk: ``SafetensorError``, which is
    no ``OSError``) is an ``OSError`` naming the file, as every other failed write."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as err:
        raise OSError(f"{path}: {' '.join(str(err).split())}") from None


def save_torch(obj, path: str | os.PathLike) -> None:
    """``torch.save`` whose failed write (a full disk: a ``RuntimeError`` from its zip writer,
    "unexpected pos ..." or "iostream error") is an ``OSError`` naming the file and the space
    left on its filesystem, as every other failed write."""
    import torch

    try:
        torch.save(obj, path)
    except RuntimeError as err:
        first = " ".join(str(err).split())[:200]
        if not any(marker in first for marker in _WRITER_FAILURES):
            raise  # not the file writer's (a device error while copying the state): as it is
        raise OSError(f"{path}: the write failed ({first}); {_free_mib(Path(path).parent)} MiB free "
                      "on its filesystem") from None


# what torch.save's zip writer says when the write under it fails (a full disk, a vanished dir)
_WRITER_FAILURES = ("unexpected pos", "iostream", "PytorchStreamWriter", "file_like", "cannot be opened",
                    "Parent directory", "No space left")


def _free_mib(directory: Path) -> str:
    try:
        return str(shutil.disk_usage(directory).free // 2**20)
    except OSError:
        return "?"


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the complete directory ``tmp`` onto ``final``. An existing ``final`` is renamed
    aside first and deleted last, so at no moment is neither copy on disk."""
    tmp, final = Path(tmp), Path(final)
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".old-{final.name}")
    _remove(old)
    os.replace(final, old)
    os.replace(tmp, final)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _occupied(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def refuse_existing(outputs: Iterable[str | os.PathLike | None], overwrite: bool,
                    inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Raise ``FileExistsError`` naming the outputs that exist (files, non-empty directories)
    unless ``overwrite``; raise ``ValueError`` for an output that is or holds one of
    ``inputs``, which overwriting it would destroy (``None`` entries are skipped)."""
    outputs = [Path(p) for p in outputs if p]
    sources = [Path(p).resolve() for p in inputs if p]
    for out in outputs:
        real = out.resolve()
        for source in sources:
            if real == source or real in source.parents:
                raise ValueError(f"output {out} is or holds the input {source}: choose another output")
    existing = [str(p) for p in outputs if _occupied(p)]
    if existing and not overwrite:
        raise FileExistsError(f"output exists: {', '.join(existing)} (use --overwrite)")


def refuse_inputs(outputs: dict[str, str | os.PathLike | None],
                  inputs: dict[str, str | os.PathLike | None]) -> None:
    """Raise ``ValueError`` for an output (``{flag: path}``) that is, or is a directory holding,
    one of ``inputs`` (``{flag: path}``): writing or replacing it would destroy that input.
    Flags name both sides in the message; ``None`` paths are skipped."""
    sources = {flag: Path(p).resolve() for flag, p in inputs.items() if p}
    for out_flag, out in outputs.items():
        if not out:
            continue
        real = Path(out).resolve()
        for flag, source in sources.items():
            if real == source or real in source.parents:
                raise ValueError(f"{out_flag} {out} is or holds the input {flag} {source}: "
                                 "choose another output")


def refuse_foreign(directory: str | os.PathLike, is_ours, flag: str = "--output_dir") -> None:
    """Raise ``FileExistsError`` if ``directory`` holds anything ``is_ours(path)`` does not
    claim: --overwrite replaces what a script wrote, never a file it did not write."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    foreign = sorted(p.name for p in directory.iterdir() if not is_ours(p))
    if foreign:
        raise FileExistsError(f"--overwrite refuses to delete {flag} {directory}: it holds files this "
                              f"script did not write: {', '.join(foreign[:5])}")



def check_writable(path: str | os.PathLike, flag: str) -> None:
    """Raise ``PermissionError`` naming ``flag`` if ``path`` cannot be written: the nearest
    directory on its way that exists must be writable. A check made before long work (a
    read-only disk refused before the scoring, not after); a write that fails later anyway (a
    full disk) is still cleaned up by the writers above."""
    path = Path(path)
    parent = next(d for d in [path.parent, *path.parent.parents] if d.exists() or d == d.parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: {parent} is not writable (a read-only disk or directory)")

@contextmanager
def temporary_dir(final: str | os.PathLike) -> Iterator[Path]:
    """A fresh ``.tmp-<name>`` directory beside ``final`` (a stale one from a killed run is
    removed first); on any error it is removed, so a failed write (a full or read-only disk)
    leaves nothing behind. The caller moves it onto ``final`` (:func:`replace_dir`)."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    _remove(tmp)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


LOCK_FILE = ".slimrank.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class DirLock:
    """One writer per directory: ``<dir>/.slimrank.lock`` holds the writer's pid. A lock whose
    process is alive is refused; a stale one (its process is gone) is named, never taken
    silently: the message says how to remove it. Released by :meth:`release` (and at exit)."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / LOCK_FILE
        self.held = False

    def check(self) -> None:
        """Raise ``FileExistsError`` if the directory is locked (held or stale)."""
        if not self.path.exists():
            return
        try:
            pid = int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        if pid is not None and _alive(pid):
            raise FileExistsError(f"{self.path.parent} is in use by process {pid} (lock file {self.path}): "
                                  "one process writes a run directory at a time")
        raise FileExistsError(f"{self.path.parent} has a stale lock {self.path} (process {pid} is gone: a "
                              f"run that was killed); check that nothing writes there, then remove it: "
                              f"rm {self.path}")

    def acquire(self) -> "DirLock":
        import atexit

        self.check()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self.check()
            raise
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        self.held = True
        atexit.register(self.release)
        return self

    def release(self) -> None:
        """Remove the lock file if it is still this process's (a dir replaced under it, e.g.
        by 04, took the file along; another process may hold the new one)."""
        if self.held:
            self.held = False
            try:
                mine = self.path.read_text().split()[:1] == [str(os.getpid())]
            except OSError:
                return
            if mine:
                try:
                    self.path.unlink(missing_ok=True)
                except OSError:  # a dir turned read-only: the lock stays, named as stale next time
                    pass
