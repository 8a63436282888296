"""GGUF files converted once and kept as ordinary Hugging Face folders, safely.

transformers dequantises a GGUF file on every load (15-40 s); linlens converts it once and saves the result in its
cache, so later loads take a second or two:

    $LINLENS_CACHE_DIR, else $XDG_CACHE_HOME/linlens, else ~/.cache/linlens   (sub-folder gguf/<stem>-<key>/)

The key covers the file's path, size and modification time and the transformers version, so a changed file or
library converts again. A cached folder is trusted only when it is complete:

- a conversion is written into a staging folder and renamed into place as its last step (atomic on one file
  system), after every file was flushed to disk, so a process killed mid-way (SIGTERM, SIGKILL, power loss) leaves
  at most a staging folder that nothing trusts, and the next start removes it and converts again;
- the folder holds a manifest of its files and their sizes, written last; a folder whose files do not match it
  (a truncated copy, a damaged disk) is removed and converted again;
- an exclusive lock serialises conversions of the same file across processes, so two servers starting together
  convert once;
- a full disk is reported as such (:class:`ModelCacheError`), with the folder and the space needed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from linlens.models.progress import LoadProgress, disk_usage

log = logging.getLogger(__name__)

#: The file that marks a complete conversion: every other file of the folder with its size in bytes.
MANIFEST = "linlens-manifest.json"
_STAGING = "-staging-"


class ModelCacheError(OSError):
    """The converted model could not be written to (or read from) the cache; the message says what to do."""


def cache_dir() -> Path:
    """Where converted models are kept (see the module docstring)."""
    if os.environ.get("LINLENS_CACHE_DIR"):
        return Path(os.environ["LINLENS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "linlens"


def cache_folder(gguf: Path) -> Path:
    """The folder a conversion of ``gguf`` lives in (whether or not it exists yet)."""
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{digest}"


def problem_with(folder: Path) -> str | None:
    """Why ``folder`` is not a complete conversion, or None when its files match its manifest."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "it has no manifest (an interrupted or older conversion)"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its manifest is unreadable ({exc})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def converted(gguf: Path, progress: LoadProgress) -> Path:
    """An HF folder holding ``gguf`` converted to float32: the cached one, or a new conversion (see module doc)."""
    folder = cache_folder(gguf)
    if problem_with(folder) is None:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder, progress):
        problem = problem_with(folder)
        if problem is None:  # another process converted it while this one waited for the lock
            return folder
        _remove_leftovers(folder, problem)
        _convert(gguf, folder, progress)
    return folder


def discard(folder: Path, why: str) -> None:
    """Remove a cached conversion that failed to load, so that the next load converts again."""
    log.warning("discarding the cached conversion %s: %s", folder, why)
    with contextlib.suppress(FileNotFoundError):
        (folder / MANIFEST).unlink()
    shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _exclusive(folder: Path, progress: LoadProgress) -> Iterator[None]:
    """Hold the lock that serialises conversions of ``folder`` across processes (released when a process dies)."""
    with open(folder.parent / f".{folder.name}.lock", "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with progress.phase("waiting for another process that is converting the same GGUF file"):
                fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(folder: Path, problem: str) -> None:
    """Under the lock: staging folders of interrupted conversions, and an incomplete or damaged cached folder."""
    for staging in folder.parent.glob(f".{folder.name}{_STAGING}*"):
        log.info("removing %s, left by an interrupted conversion", staging)
        shutil.rmtree(staging, ignore_errors=True)
    if folder.exists():
        discard(folder, problem)


def _convert(gguf: Path, folder: Path, progress: LoadProgress) -> None:
    with progress.phase(f"converting {gguf.name} to float32 (first load only; cached in {folder.parent})"):
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The tensors are already dequantised to float32; only the loader's GGUF marker blocks save_pretrained.
    setattr(model, "hf_quantizer", None)  # noqa: B010
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}{_STAGING}", dir=folder.parent))
    try:
        with progress.phase("writing the converted model to the cache", disk_usage(lambda: staging, size)):
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            _finish(staging)
        staging.rename(folder)
        _fsync(folder.parent)
    except Exception as exc:
        if _is_disk_full(exc):
            raise ModelCacheError(
                errno.ENOSPC,
                f"no space left on the device of {folder.parent} while caching the converted model (about "
                f"{size / 1e6:.0f} MB are needed); free space there or point LINLENS_CACHE_DIR at another disk",
            ) from exc
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("cached the conversion of %s in %s", gguf.name, folder)


def _finish(staging: Path) -> None:
    """Flush every file, then write the manifest (the mark of a complete folder) and flush it too."""
    files = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        _fsync(path)
        files[str(path.relative_to(staging))] = path.stat().st_size
    manifest = staging / MANIFEST
    manifest.write_text(json.dumps({"files": files}, indent=1), encoding="utf-8")
    _fsync(manifest)
    _fsync(staging)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_disk_full(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if getattr(seen, "errno", None) == errno.ENOSPC or "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


__all__ = ["MANIFEST", "ModelCacheError", "cache_dir", "cache_folder", "converted", "discard", "problem_with"]
