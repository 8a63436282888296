"""Continuous batching: the generation requests of one model decode together, one forward pass per step for all.

A :class:`DecodeBatch` owns one decode thread (the server keeps a batch per model and steering). A request (a
:class:`BatchRow`) is queued; at the next token boundary the thread prefills its prompt *alone* (a batch of one, so
its first token is exactly what it would be served alone) and then merges its KV cache into the running batch: the
batch's cache is left-padded to a common length, with an attention mask and per-row position ids, so every row sees
exactly its own tokens. Each step runs one forward pass for all active rows, then handles each row by itself: the
generation config's logits processors, the log-probability, the choice of token (argmax, or a draw from the row's
own ``torch.Generator``), the stream callback, stop sequences, EOS, the token budget and the caller's cancellation. A
finished or cancelled row leaves the batch at once (its cache row is dropped; padding columns no row needs any more
are cut).

A batch may be steered (``steer``): every forward pass it runs then runs inside that one steering, so only requests
of exactly the same steering share it (the server keeps one batch per model and steering; see ``_steered`` for why
one steering context serves rows of different prompt lengths).

Why not transformers' own continuous batching (``generate_batch`` / ``ContinuousBatchingManager``): see
docs/operations.md, "Batched generation". In short, its manager owns sampling (one generation config for the whole
manager, the global RNG), so per-request seeds, temperatures, stop strings, ``ignore_eos`` and per-step logprobs and
cancellation would need hooks it does not have.

Sliding-window models (gemma2/3, qwen3, phi3, mistral, cohere2, ...) batch too, with the very cache layers
transformers gives them (``DynamicSlidingWindowLayer``, which keeps only the last ``window - 1`` positions). Every
layer of the batch's cache spans the same columns: a full layer holds all ``L`` of them, a window layer the last
``min(L, window - 1)``, and its ``cumulative_length`` is ``L``. transformers' masks then index the 2D padding mask at
absolute columns (``kv_offset`` + i), so each row sees its own tokens inside its own window: left padding shifts a
row's query and keys alike, and the window is a difference of columns. Models with any other kind of cache layer are
served by the same loop one request at a time.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from transformers import DynamicCache, LogitsProcessorList
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

_log = logging.getLogger(__name__)

#: Defaults of the two settings (measured on the 2-core CPU machine; see docs/operations.md).
DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_MAX_BATCH_TOKENS = 16384
#: Seconds without work after which a model's decode thread ends (a new request starts it again).
IDLE_S = 10.0


class BatchRow:
    """One request's place in a batch: what it asks for and the per-step hook that consumes each step's logits.

    ``step(logits)`` gets the row's float32 logits of one position (shape (V,)) and returns the chosen token id and
    whether the row is finished. ``should_stop`` is polled before every step; a row that should stop leaves at once.
    """

    def __init__(
        self,
        prompt: list[int],
        step: Callable[[torch.Tensor], tuple[int, bool]],
        should_stop: Callable[[], bool],
        cost: int,
    ) -> None:
        self.prompt = prompt
        self.step = step
        self.should_stop = should_stop
        #: cache positions the row may come to hold (prompt + token budget), counted against max_batch_tokens
        self.cost = cost
        self.submitted = time.monotonic()
        self.joined: float | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.last_token = 0

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.done.set()


class DecodeBatch:
    """The decode loop of one model; see the module docstring. Thread-safe; its thread starts on first use."""

    def __init__(
        self,
        model: Any,
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        on_step: Callable[[int], None] | None = None,
        on_join: Callable[[float], None] | None = None,
        steer: Callable[[int], AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.model = model
        #: the steering of every forward pass this batch runs (all its rows share it), given the prompt length
        self.steer = steer
        self.max_batch_size = max(1, max_batch_size)
        self.max_batch_tokens = max_batch_tokens
        self.on_step = on_step
        self.on_join = on_join
        self._pending: collections.deque[BatchRow] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False  # close() asked the thread to end once the batch is empty
        # the batch, touched only by the decode thread
        self._rows: list[BatchRow] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (B, L) 1 for a real token, 0 for left padding
        #: whether rows can share a batch (every cache layer one this module knows how to merge); else one at a time
        self._mergeable = _mergeable(model.config)

    # --- the request side ----------------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Whether no request is in or waiting for this batch (its thread has ended or is about to)."""
        with self._cond:
            return self._thread is None and not self._pending

    def _steered(self, prompt_length: int) -> AbstractContextManager[Any]:
        """The batch's steering around one forward pass, or nothing.

        A prefill runs for one row with that row's prompt length. A decode step's query positions are all generated
        ones (each row's position is at least its own prompt length); every steering mode treats those alike
        (``PROMPT`` steers none, ``GENERATED`` and ``ALL`` every one), which prompt length 0 says for all rows at
        once, whatever their own prompt lengths."""
        return self.steer(prompt_length) if self.steer is not None else contextlib.nullcontext()

    def close(self, timeout: float) -> bool:
        """End the decode thread as soon as no row is in or waiting for the batch (a drained server's are all
        stopped), so that no thread of ours runs the model while the process exits; True when it ended within
        ``timeout`` seconds. A later :meth:`run` starts a new thread."""
        end = time.monotonic() + timeout
        with self._cond:
            thread = self._thread
            self._closing = True
            self._cond.notify_all()
            while self._thread is not None:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        if thread is not None:  # it has let go of the batch; wait for it to return, too
            thread.join(max(0.0, end - time.monotonic()))
            return not thread.is_alive()
        return True

    def run(self, row: BatchRow) -> None:
        """Queue ``row`` and block until it is finished (its ``step`` said so, it stopped, or it failed)."""
        with self._cond:
            self._closing = False
            self._pending.append(row)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="linlens-decode", daemon=True)
                self._thread.start()
            self._cond.notify()
        row.done.wait()
        if row.error is not None:
            raise row.error

    # --- the decode thread ---------------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                joining = self._take_pending()
                if joining is None:
                    return  # idle: the thread ends, and the next request starts a new one
                for row in joining:
                    try:
                        self._join(row)
                    except BaseException as exc:  # its prefill failed: that row fails, the batch goes on
                        _log.exception("prefill of a batched row failed")
                        row.finish(exc)
                try:
                    if self._rows:
                        self._step()
                except BaseException as exc:  # a failed forward pass fails the rows it was for, not the server
                    _log.exception("batched decode step failed")
                    for row in self._rows:
                        row.finish(exc)
                    self._rows, self._cache, self._mask = [], None, None

    def _take_pending(self) -> list[BatchRow] | None:
        """The rows to join now; None when nothing came for IDLE_S seconds (the thread then ends, so that a stopped
        server's model is not held by an idle decode thread)."""
        with self._cond:
            while not self._pending and not self._rows:
                if self._closing or (not self._cond.wait(IDLE_S) and not self._pending):
                    self._thread = None
                    self._cond.notify_all()  # close() may be waiting for this
                    return None
            taken: list[BatchRow] = []
            if not self._mergeable and self._rows:
                return taken  # one at a time for this model
            room = self.max_batch_size - len(self._rows)
            held = sum(r.cost for r in self._rows)
            while self._pending and room > 0:
                row = self._pending[0]
                if (self._rows or taken) and held + row.cost > self.max_batch_tokens:
                    break
                self._pending.popleft()
                taken.append(row)
                room -= 1
                held += row.cost
                if not self._mergeable:
                    break
            return taken

    def _join(self, row: BatchRow) -> None:
        row.joined = time.monotonic()
        if self.on_join is not None:
            self.on_join(row.joined - row.submitted)
        if row.should_stop():
            row.finish()
            return
        model = self.model
        ids = torch.tensor([row.prompt], dtype=torch.long, device=model.device)
        cache = DynamicCache(config=model.config)
        with self._steered(len(row.prompt)):
            out = model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        token, finished = row.step(out.logits[0, -1].float())
        if finished:
            row.finish()
            return
        row.last_token = token
        self._merge(row, cache, len(row.prompt))

    def _merge(self, row: BatchRow, cache: DynamicCache, length: int) -> None:
        device = self.model.device
        if self._cache is None or self._mask is None or not self._rows:
            self._rows, self._cache = [row], cache
            self._mask = torch.ones((1, length), dtype=torch.long, device=device)
            return
        have = self._mask.shape[1]
        width = max(have, length)
        mine_layers: list[Any] = list(self._cache.layers)
        their_layers: list[Any] = list(cache.layers)
        for mine, theirs in zip(mine_layers, their_layers, strict=True):
            held = _held(mine, width)  # columns this layer holds: all of them, or the last window - 1
            mine.keys = torch.cat([_left_pad(mine.keys, held), _left_pad(theirs.keys, held)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, held), _left_pad(theirs.values, held)], dim=0)
            if isinstance(mine, DynamicSlidingWindowLayer):
                mine.cumulative_length = width
        new_mask = torch.zeros((1, width), dtype=torch.long, device=device)
        new_mask[0, width - length :] = 1
        old_mask = torch.nn.functional.pad(self._mask, (width - have, 0))
        self._mask = torch.cat([old_mask, new_mask], dim=0)
        self._rows.append(row)

    def _step(self) -> None:
        assert self._cache is not None and self._mask is not None
        keep = [i for i, r in enumerate(self._rows) if not r.should_stop()]
        if len(keep) < len(self._rows):
            for i, r in enumerate(self._rows):
                if i not in keep:
                    r.finish()
            if not self._drop(keep):
                return
        if self.on_step is not None:
            self.on_step(len(self._rows))
        device = self.model.device
        rows = self._rows
        length = self._mask.shape[1]
        positions = self._mask.sum(dim=1, keepdim=True)
        self._mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=torch.long, device=device)], dim=1)
        tokens = torch.tensor([[r.last_token] for r in rows], dtype=torch.long, device=device)
        with self._steered(0):
            out = self.model(
                input_ids=tokens,
                attention_mask=self._mask,
                position_ids=positions,
                cache_position=torch.tensor([length], dtype=torch.long, device=device),
                cache=self._cache,
                use_cache=True,
            )
        logits = out.logits[:, -1].float()
        keep = []
        for i, row in enumerate(rows):
            try:
                token, finished = row.step(logits[i])
            except BaseException as exc:  # a row's own failure (e.g. its callback) ends that row only
                row.finish(exc)
                continue
            if finished:
                row.finish()
            else:
                row.last_token = token
                keep.append(i)
        if len(keep) < len(rows):
            self._drop(keep)

    def _drop(self, keep: list[int]) -> bool:
        """Keep only the rows ``keep`` (indices); False when none is left."""
        assert self._cache is not None and self._mask is not None
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return False
        index = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        used = torch.nonzero(mask.any(dim=0))
        start = int(used[0]) if used.numel() else 0
        width = mask.shape[1] - start
        layers: list[Any] = list(self._cache.layers)
        for layer in layers:
            cut = layer.keys.shape[-2] - _held(layer, width)  # a window layer may hold fewer columns than that
            layer.keys = layer.keys.index_select(0, index)[..., cut:, :]
            layer.values = layer.values.index_select(0, index)[..., cut:, :]
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.cumulative_length = width
        self._mask = mask[:, start:]
        self._rows = [self._rows[i] for i in keep]
        return True


#: The cache layers whose rows :class:`DecodeBatch` can merge and drop (exact types: a subclass may keep more state).
_MERGEABLE = (DynamicLayer, DynamicSlidingWindowLayer)


def _mergeable(config: Any) -> bool:
    """Whether a model's rows can be merged into one left-padded batch: every cache layer a plain or sliding-window
    one, and no chunked attention (transformers keeps its cache in the same window layer, but its mask depends on a
    token's absolute position, which left padding shifts)."""
    layer_types = getattr(config.get_text_config(decoder=True), "layer_types", None) or ()
    if "chunked_attention" in layer_types:
        return False
    return all(type(layer) in _MERGEABLE for layer in DynamicCache(config=config).layers)


def _held(layer: Any, width: int) -> int:
    """How many of a batch's last ``width`` columns ``layer`` holds: all, or for a window layer the last
    ``window - 1`` (what ``DynamicSlidingWindowLayer.update`` keeps)."""
    if isinstance(layer, DynamicSlidingWindowLayer):
        return min(width, layer.sliding_window - 1)
    return width


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` (B, H, S, D) padded with zeros on the left of S to ``width``."""
    missing = width - t.shape[-2]
    if missing <= 0:
        return t
    return torch.nn.functional.pad(t, (0, 0, missing, 0))


def processors_for(model: Any, config: Any, prompt_length: int) -> LogitsProcessorList:
    """The logits processors ``model.generate`` would apply for ``config`` (repetition penalty, suppressed tokens,
    ...): a batched row applies the same ones, to its own ids, so that it decodes what generate would."""
    return model._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=prompt_length,
        encoder_input_ids=None,
        prefix_allowed_tokens_fn=None,
        logits_processor=LogitsProcessorList(),
        device=str(model.device),
        model_kwargs={},
    )


__all__ = ["DEFAULT_MAX_BATCH_SIZE", "DEFAULT_MAX_BATCH_TOKENS", "BatchRow", "DecodeBatch", "processors_for"]
