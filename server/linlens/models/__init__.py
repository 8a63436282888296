"""Model loading: registry names backed by PyPI packages, local folders, GGUF files (converted once, cached)."""

from linlens.contract.options import DEFAULT_MODEL
from linlens.models.gguf_cache import ModelCacheError, cache_dir
from linlens.models.loader import LoadedModel, display_name, load_model, resolve
from linlens.models.progress import LoadProgress
from linlens.models.registry import REGISTRY, ModelNotInstalledError, RegistryEntry

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "LoadProgress",
    "LoadedModel",
    "ModelCacheError",
    "ModelNotInstalledError",
    "RegistryEntry",
    "cache_dir",
    "display_name",
    "load_model",
    "resolve",
]
