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

import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same directory + ``os.replace``."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


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
