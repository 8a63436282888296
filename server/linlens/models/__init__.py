"""Model loading: registry names backed by PyPI packages, local folders, GGUF files (converted once, cached)."""

from linlens.models.loader import LoadedModel, cache_dir, load_model, resolve
from linlens.models.registry import DEFAULT_MODEL, REGISTRY, ModelNotInstalledError, RegistryEntry

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "LoadedModel",
    "ModelNotInstalledError",
    "RegistryEntry",
    "cache_dir",
    "load_model",
    "resolve",
]
