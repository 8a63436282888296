"""Load a causal LM the way any transformers user does: a registry name, a local HF folder, a .gguf file, a hub id.

GGUF files (the registry's models are GGUF files shipped in PyPI packages) are converted once and cached
(:mod:`linlens.models.gguf_cache`). Loading reports its phases (:class:`~linlens.models.progress.LoadProgress`), so a
first start that converts shows progress instead of silence.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from linlens.engine import Explainer, UnsupportedArchitectureError, family_of
from linlens.models import gguf_cache
from linlens.models.progress import LoadProgress
from linlens.models.registry import REGISTRY

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def display_name(name_or_path: str) -> str:
    """The name requests use for a model reference, known before anything is loaded: a registry name as it is, a
    .gguf path its file stem, a folder its name, anything else (a hub id) as it is."""
    if name_or_path in REGISTRY:
        return name_or_path
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        return path.stem
    if path.is_dir():
        return path.name
    return name_or_path


def resolve(name_or_path: str, progress: LoadProgress | None = None) -> tuple[str, str]:
    """Map a model reference to (display name, HF folder or hub id to load from), converting a GGUF file once."""
    progress = progress or LoadProgress(display_name(name_or_path))
    name = display_name(name_or_path)
    if name_or_path in REGISTRY:
        return name, str(gguf_cache.converted(REGISTRY[name_or_path].locate(), progress))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return name, str(gguf_cache.converted(path, progress))
    if path.is_dir():
        return name, str(path)
    if path.exists():
        raise ValueError(f"{path} is neither a model folder nor a .gguf file")
    known = ", ".join(sorted(REGISTRY))
    # Anything else is a hub id: transformers fetches it where a hub is reachable (not on these machines).
    log.info("%r is not a registry name (%s) or a local path; treating it as a hub id", name_or_path, known)
    return name, name_or_path


def load_model(
    name_or_path: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    attention: str | None = None,
    progress: LoadProgress | None = None,
) -> LoadedModel:
    """Load a model and its tokenizer, ready to generate and to be explained. Raises for unsupported families.

    ``attention`` is the served model's attention implementation (transformers' ``attn_implementation``: "sdpa",
    "eager", ...; None: transformers' own choice, SDPA where the family supports it). The linear twin computes its
    attention values with the same kernel (eager or SDPA), so with either an explanation can read the prediction off
    the twin's forward pass instead of running the model a second time (engine/context.py ``twin_is_served``).

    A cached GGUF conversion that fails to load is discarded and converted again, once.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    progress = progress or LoadProgress(display_name(name_or_path))
    started = time.perf_counter()
    name, source = resolve(name_or_path, progress)
    try:
        return _load(name, source, dtype, device, attention, progress, started)
    except UnsupportedArchitectureError:
        raise
    except Exception as exc:
        folder = Path(source)
        if not folder.is_relative_to(gguf_cache.cache_dir()):
            raise
        gguf_cache.discard(folder, f"loading it failed ({type(exc).__name__}: {exc})")
        name, source = resolve(name_or_path, progress)
        return _load(name, source, dtype, device, attention, progress, started)


def _load(
    name: str, source: str, dtype: str, device: str, attention: str | None, progress: LoadProgress, started: float
) -> LoadedModel:
    config = transformers.AutoConfig.from_pretrained(source)
    architecture = (config.architectures or ["?"])[0]
    family = family_of(architecture)  # refuse before spending time on the weights
    with progress.phase("loading the weights"):
        model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[dtype], attn_implementation=attention)
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
