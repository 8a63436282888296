"""The configured models and where each is in its life: loading (with what the loader is doing), ready, or failed.

Models load once, at start-up, one after another on a background thread, so that the server answers (health,
ListModels, UNAVAILABLE for a model still loading) from its first second. Listeners hear every change; the server
turns them into grpc.health.v1 statuses:

- each model's name is SERVING when that model is ready;
- the whole server ("" and linlens.v1.LinlensService) is SERVING once loading has finished and the *default* model
  is ready: a request that names no model can then be served. A secondary model that failed to load does not take
  the server out of rotation (its own name stays NOT_SERVING and its requests fail with FAILED_PRECONDITION);
  ``linlens serve`` exits with status 1 when the default model fails to load.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from linlens.contract import ExplainOptions, ModelInfo, ModelState
from linlens.models import LoadedModel, LoadProgress, display_name, load_model
from linlens.server.config import ServerConfig
from linlens.server.generation import Sampling, generate
from linlens.server.inputs import InputError, encode_text
from linlens.server.metrics import Metrics
from linlens.server.status import RpcFailure

_log = logging.getLogger(__name__)


@dataclass
class ModelSlot:
    """One configured model: its reference, the name requests use, its state and, once ready, the model."""

    ref: str
    name: str
    state: ModelState = ModelState.LOADING
    loaded: LoadedModel | None = None
    #: While loading, what the loader is doing; after a failure, why it failed.
    detail: str = ""


class ModelHost:
    """The configured models, loaded once."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.slots: dict[str, ModelSlot] = {}
        for ref in config.models:
            name = display_name(ref)
            if name in self.slots:
                raise ValueError(f"two configured models are both called {name!r}; give each model once")
            self.slots[name] = ModelSlot(ref=ref, name=name)
        self.default_name = next(iter(self.slots))
        self._lock = threading.Lock()
        self._listeners: list[Callable[[ModelSlot], None]] = []

    # -- state -------------------------------------------------------------------------------------------------

    def on_change(self, listener: Callable[[ModelSlot], None]) -> None:
        """Call ``listener(slot)`` after every change of a slot's state."""
        self._listeners.append(listener)

    def _set(self, slot: ModelSlot, state: ModelState, detail: str = "", loaded: LoadedModel | None = None) -> None:
        with self._lock:
            slot.state, slot.detail = state, detail
            if loaded is not None:
                slot.loaded = loaded
        for listener in self._listeners:
            try:
                listener(slot)
            except Exception:
                _log.exception("model state listener failed")

    @property
    def loading_finished(self) -> bool:
        return all(s.state is not ModelState.LOADING for s in self.slots.values())

    @property
    def serving(self) -> bool:
        """The whole server's health (see the module docstring): loading over and the default model ready."""
        return self.loading_finished and self.slots[self.default_name].state is ModelState.READY

    # -- loading -----------------------------------------------------------------------------------------------

    def adopt(self, loaded: LoadedModel) -> None:
        """Serve an already loaded model (tests and notebooks load once and start several servers)."""
        slot = self.slots.get(loaded.name)
        if slot is None:
            raise ValueError(f"model {loaded.name!r} is not among the configured models {list(self.slots)}")
        if self.config.warmup:
            warm_up(loaded)
        self._set(slot, ModelState.READY, loaded=loaded)

    def load_all(self, metrics: Metrics | None = None) -> None:
        """Load every configured model that is not loaded yet, one after another; failures are kept, not raised."""
        for slot in self.slots.values():
            if slot.state is not ModelState.LOADING:
                continue
            _log.info("loading model %s (%s)", slot.name, slot.ref)
            progress = LoadProgress(slot.name, on_change=functools.partial(self._loading, slot))
            try:
                loaded = load_model(
                    slot.ref,
                    dtype=self.config.dtype,
                    device=self.config.device,
                    attention=self.config.served_attention,
                    progress=progress,
                )
                if self.config.warmup:
                    with progress.phase("warming up (building the linear twin)"):
                        warm_up(loaded)
            except Exception as exc:
                _log.exception("model %s failed to load", slot.name)
                self._set(slot, ModelState.FAILED, f"{type(exc).__name__}: {exc}")
                continue
            _log.info("model %s ready: %s, loaded in %.1f s", slot.name, loaded.architecture, loaded.load_seconds)
            if metrics is not None:
                metrics.observe_model_load(slot.name, loaded.load_seconds, model_labels(loaded))
            self._set(slot, ModelState.READY, loaded=loaded)

    def _loading(self, slot: ModelSlot, detail: str) -> None:
        """The loader's new phase; between two phases (detail empty) the last one stays what clients are told."""
        with self._lock:
            if slot.state is ModelState.LOADING and detail:
                slot.detail = detail

    # -- requests ----------------------------------------------------------------------------------------------

    def resolve(self, name: str) -> ModelSlot:
        """The slot for a request's model name (empty: the default), or NOT_FOUND listing what there is.

        A request may also name a model the way it was configured: by its folder or .gguf path (as given, or any
        path to a folder or file of the same name, since a client's path need not be the server's).
        """
        slot = self.slots.get(name or self.default_name) or self._by_reference(name)
        if slot is None:
            raise RpcFailure(
                grpc.StatusCode.NOT_FOUND,
                f"unknown model {name!r}; this server serves: {', '.join(self.slots)} "
                f"(an empty name means {self.default_name})",
            )
        return slot

    def _by_reference(self, reference: str) -> ModelSlot | None:
        if not reference:
            return None
        for slot in self.slots.values():
            if reference == slot.ref or _same_path(reference, slot.ref):
                return slot
        path = Path(reference).expanduser()
        if path.suffix == ".gguf" or path.is_dir() or reference.startswith((".", "/", "~")):
            return self.slots.get(display_name(reference) if path.suffix == ".gguf" else path.name)
        return None

    def ready(self, name: str) -> LoadedModel:
        """The loaded model for a request: UNAVAILABLE while it loads (retry), FAILED_PRECONDITION if it failed."""
        slot = self.resolve(name)
        if slot.state is ModelState.LOADING:
            doing = f" ({slot.detail})" if slot.detail else ""
            raise RpcFailure(
                grpc.StatusCode.UNAVAILABLE,
                f"model {slot.name!r} is still loading{doing}; retry in a few seconds, or wait for its health "
                "status to be SERVING (Client.wait_until_ready)",
            )
        if slot.state is ModelState.FAILED or slot.loaded is None:
            raise RpcFailure(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {slot.name!r} failed to load ({slot.detail}); the operator must fix the server's model setting",
            )
        return slot.loaded

    def info(self, slot: ModelSlot) -> ModelInfo:
        """What ListModels and GetModel say about a slot."""
        m = slot.loaded
        return ModelInfo(
            name=slot.name,
            family=m.family if m else "",
            architecture=m.architecture if m else "",
            hidden_size=m.hidden_size if m else 0,
            num_layers=m.num_layers if m else 0,
            vocab_size=m.vocab_size if m else 0,
            dtype=m.dtype if m else "",
            device=m.device if m else "",
            load_seconds=m.load_seconds if m else 0.0,
            max_positions=m.max_positions if m else 0,
            source=m.source if m else slot.ref,
            is_default=slot.name == self.default_name,
            loaded=slot.state is ModelState.READY,
            state=slot.state,
            state_detail=slot.detail,
        )


def _same_path(a: str, b: str) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def warm_up(loaded: LoadedModel) -> float:
    """One tiny generation and attributions-only explanation: builds the linear twin and primes the allocator."""
    started = time.monotonic()
    try:
        ids = encode_text(loaded.tokenizer, "Hello, world")
    except InputError:  # a tokenizer without these words and without a BOS (tiny test vocabularies)
        ids = [0]
    generate(loaded.model, loaded.tokenizer, ids, Sampling(max_new_tokens=2), max_positions=loaded.max_positions)
    loaded.explainer.explain(ids, ExplainOptions(top_k=0))
    seconds = time.monotonic() - started
    _log.info("model %s warmed up in %.1f s", loaded.name, seconds)
    return seconds


def model_labels(loaded: LoadedModel) -> dict[str, str]:
    """The labels of the model-info metric."""
    return {
        "family": loaded.family,
        "architecture": loaded.architecture,
        "dtype": loaded.dtype,
        "device": loaded.device,
        "hidden_size": str(loaded.hidden_size),
        "num_layers": str(loaded.num_layers),
        "vocab_size": str(loaded.vocab_size),
    }


__all__ = ["ModelHost", "ModelSlot", "model_labels", "warm_up"]
