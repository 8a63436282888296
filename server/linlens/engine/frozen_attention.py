"""Attention with frozen softmax weights, applied without keeping the weights: O(n d) memory per layer, not O(h n²).

Why (issue 17, long prompts' memory): the linear twin's attention is A v, with A = softmax(q k^T s + mask) frozen.
Kept whole, A holds heads x n² numbers per layer, in the coefficient tape and in the graph of A v. On SmolLM2 at
2,048 tokens that is 4.5 GB, more than the plain model's whole forward + backward, which never forms A (SDPA).

A depends only on q and k (the mask depends on positions alone), so freezing q and k freezes A. This module keeps q
and k and recomputes A a block of query rows at a time, wherever A is needed:

- :func:`frozen_attention` (v -> A v) is an autograd function whose backward is A^T g, the values' gradient (q and k
  get none: they are frozen);
- that backward is itself an autograd function (:class:`_AttendTransposed`), whose backward is A h again, so the
  double backward that :mod:`linlens.engine.products` takes its JVPs from works;
- forward-mode AD gets A v_dot;
- a batched backward (``is_grads_batched``) batches the rows of g through the same recomputed block.

Each product recomputes q k^T and the softmax once per block. Apart from that, it does what a kept A would do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: Attention weights (heads x queries x keys) up to which a call keeps its frozen weights whole instead of
#: recomputing them: 256 Ki numbers, 1 MiB a layer in float32 (SmolLM2's 9 heads up to 170 tokens, the last
#: position's own graph up to 29,000). Below it a recomputation would cost each product a few small operations per
#: layer (measured +25 ms on SmolLM2's 7-token `Explain(top_k=0)`, 15%) to save almost nothing.
KEEP_WHOLE_ELEMENTS = 1 << 18


def keeps_whole(heads: int, queries: int, keys: int) -> bool:
    """Whether an attention call of this size keeps its frozen weights whole (:data:`KEEP_WHOLE_ELEMENTS`)."""
    return heads * queries * keys <= KEEP_WHOLE_ELEMENTS


#: Attention weights per recomputed block (query rows x keys x heads): 4 Mi numbers, 16 MiB in float32. The
#: block bounds the transient memory of every product; the rows it covers shrink as the prompt grows.
BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class FrozenScores:
    """The frozen inputs of one attention call's softmax weights A (batch, heads, queries, keys): everything A is
    computed from, and nothing of size queries x keys. The one home of the weights' arithmetic: the ordinary twin,
    which freezes nothing, computes its weights with it too, from live queries and keys."""

    #: (batch, heads, queries, head_dim), detached (live only in the ordinary twin).
    query: torch.Tensor
    #: (batch, heads, keys, head_dim), expanded to the query heads (grouped-query attention); as the query.
    key: torch.Tensor
    #: Broadcastable to (batch, heads, queries, keys): additive, or boolean (True: attend), as transformers builds
    #: it for eager or SDPA attention; or None.
    mask: torch.Tensor | None
    #: With no mask: whether query i may see only keys up to i + (keys - queries) (SDPA's ``is_causal``, for which
    #: transformers builds no mask). A block builds its own rows of that pattern, so no queries x keys tensor exists.
    causal: bool
    scale: float
    softcap: float | None
    #: The softmax's own precision (float32 for half types, as transformers computes it).
    softmax_dtype: torch.dtype

    def weights(self, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        """A[:, :, rows, :] in ``dtype``: the same arithmetic as an eager softmax attention, for these query rows."""
        scores = torch.matmul(self.query[:, :, rows], self.key.transpose(2, 3)) * self.scale
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        keys = self.key.shape[-2]
        if self.mask is not None:
            mask = (self.mask[:, :, rows] if self.mask.shape[2] > 1 else self.mask)[..., :keys]
            if mask.dtype == torch.bool:
                mask = additive(mask, scores.dtype)
            scores = scores + mask
        elif self.causal:
            first = (rows.start or 0) + keys - self.query.shape[-2]
            query_at = torch.arange(first, first + scores.shape[-2], device=scores.device)
            scores = scores + additive(query_at[:, None] >= torch.arange(keys, device=scores.device), scores.dtype)
        return torch.softmax(scores, dim=-1, dtype=self.softmax_dtype).to(dtype)

    def blocks(self) -> list[slice]:
        """Query row blocks of at most BLOCK_ELEMENTS weights each."""
        queries, keys, heads = self.query.shape[-2], self.key.shape[-2], self.query.shape[1]
        step = max(1, BLOCK_ELEMENTS // max(1, heads * keys))
        return [slice(start, min(start + step, queries)) for start in range(0, queries, step)]

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        """A v: (..., heads, keys, d) -> (..., heads, queries, d)."""
        parts = [torch.matmul(self.weights(rows, values.dtype), values) for rows in self.blocks()]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def apply_transposed(self, grad: torch.Tensor) -> torch.Tensor:
        """A^T g: (..., heads, queries, d) -> (..., heads, keys, d)."""
        blocks = self.blocks()
        if len(blocks) == 1:
            return torch.matmul(self.weights(blocks[0], grad.dtype).transpose(-1, -2), grad)
        total: torch.Tensor | None = None
        for rows in blocks:
            # narrow, not indexing: a batched backward's legacy vmap has no batching rule for the alias indexing makes
            part = torch.matmul(
                self.weights(rows, grad.dtype).transpose(-1, -2), grad.narrow(-2, rows.start, rows.stop - rows.start)
            )
            total = part if total is None else total + part
        assert total is not None
        return total


def additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of a boolean one: 0 where it attends, the dtype's lowest value elsewhere (as transformers
    make it; the one home of that conversion, for the twin's masks too)."""
    return torch.zeros((), dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)


class _Attend(torch.autograd.Function):
    """values -> A values, A frozen and recomputed (never saved)."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, scores: FrozenScores) -> torch.Tensor:
        ctx.scores = scores
        return scores.apply(values)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AttendTransposed.apply(grad, ctx.scores), None

    @staticmethod
    def jvp(ctx: Any, values_dot: torch.Tensor, _: None) -> torch.Tensor:
        return ctx.scores.apply(values_dot)


class _AttendTransposed(torch.autograd.Function):
    """grad -> A^T grad: the backward of :class:`_Attend`, as a function of its own so that it has a backward."""

    @staticmethod
    def forward(ctx: Any, grad: torch.Tensor, scores: FrozenScores) -> torch.Tensor:
        ctx.scores = scores
        return scores.apply_transposed(grad)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _Attend.apply(grad, ctx.scores), None

    @staticmethod
    def jvp(ctx: Any, grad_dot: torch.Tensor, _: None) -> torch.Tensor:
        return ctx.scores.apply_transposed(grad_dot)


def frozen_attention(values: torch.Tensor, scores: FrozenScores) -> torch.Tensor:
    """A values for the frozen weights of ``scores``, differentiable in ``values`` to any order and in forward mode."""
    result: torch.Tensor = _Attend.apply(values, scores)
    return result


__all__ = ["BLOCK_ELEMENTS", "KEEP_WHOLE_ELEMENTS", "FrozenScores", "additive", "frozen_attention", "keeps_whole"]
