"""Load a causal LM the way any transformers user does: a registry name, a local HF folder, a .gguf file, a hub id.

GGUF files are converted by transformers (dequantised) on first load, which takes 15-40 s; the converted model and
tokenizer are then saved as a normal HF folder in the linlens cache so the next load takes a few seconds:

    $LINLENS_CACHE_DIR, else $XDG_CACHE_HOME/linlens, else ~/.cache/linlens   (sub-folder gguf/<name>-<key>/)

The key covers the file's size and modification time and the transformers version, so a changed file or library
converts again. Writes are atomic (a temporary folder renamed into place), so concurrent first loads are safe.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from linlens.engine import Explainer, family_of
from linlens.models.registry import REGISTRY

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models are kept (see the module docstring)."""
    if os.environ.get("LINLENS_CACHE_DIR"):
        return Path(os.environ["LINLENS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "linlens"


@dataclass
class LoadedModel:
    """A model loaded once and served: the transformers objects plus what clients are told about it."""

    name: str
    source: str
    family: str
    architecture: str
    model: PreTrainedModel
    tokenizer: Any
    load_seconds: float
    dtype: str
    device: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    max_positions: int
    explainer: Explainer


def _gguf_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{digest}"


def _convert_gguf(gguf: Path) -> Path:
    """Return an HF folder holding the converted GGUF model, converting (once) if the cache has none."""
    folder = _gguf_cache_folder(gguf)
    if (folder / "config.json").exists():
        return folder
    log.info("converting %s (first load; cached in %s)", gguf, folder)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The tensors are already dequantised to float32; only the loader's GGUF marker blocks save_pretrained.
    setattr(model, "hf_quantizer", None)  # noqa: B010
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "config.json").exists():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def resolve(name_or_path: str) -> tuple[str, str]:
    """Map a model reference to (display name, HF folder or hub id to load from)."""
    if name_or_path in REGISTRY:
        return name_or_path, str(_convert_gguf(REGISTRY[name_or_path].locate()))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return path.stem, str(_convert_gguf(path))
    if path.is_dir():
        return path.name, str(path)
    if path.exists():
        raise ValueError(f"{path} is neither a model folder nor a .gguf file")
    known = ", ".join(sorted(REGISTRY))
    # Anything else is a hub id: transformers fetches it where a hub is reachable (not on these machines).
    log.info("%r is not a registry name (%s) or a local path; treating it as a hub id", name_or_path, known)
    return name_or_path, name_or_path


def load_model(name_or_path: str, *, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load a model and its tokenizer, ready to generate and to be explained. Raises for unsupported families."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    started = time.perf_counter()
    name, source = resolve(name_or_path)
    config = transformers.AutoConfig.from_pretrained(source)
    architecture = (config.architectures or ["?"])[0]
    family = family_of(architecture)  # refuse before spending time on the weights
    model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[dtype])
    model.to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(source)
    explainer = Explainer(model, tokenizer)
    return LoadedModel(
        name=name,
        source=source,
        family=family.name,
        architecture=architecture,
        model=model,
        tokenizer=tokenizer,
        load_seconds=time.perf_counter() - started,
        dtype=dtype,
        device=str(device),
        hidden_size=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
        vocab_size=int(config.vocab_size),
        max_positions=int(getattr(config, "max_position_embeddings", 0) or 0),
        explainer=explainer,
    )
