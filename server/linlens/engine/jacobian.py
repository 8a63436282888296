"""Jacobians of the linear twin: the full matrix in memory-bounded batches, or just the products an answer needs.

The twin's output y (d numbers) is an exact linear function of the input embeddings X (n x d). Row k of the full
Jacobian — dy_k/dX for every position at once — is one vector-Jacobian product (VJP) with the basis vector e_k, so
the whole of J costs d VJPs however long the prompt is. They run against one retained forward graph, ``chunk`` at a
time as one batched backward (``is_grads_batched``, i.e. vmap over the backward), which bounds peak memory by the
chunk rather than by d. Attributions need far less: w . J_i x_i for all i is the single VJP with cotangent w.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


class ExplanationCancelled(RuntimeError):
    """The caller asked to stop (cancelled RPC, passed deadline) before the explanation finished."""


ShouldStop = Callable[[], bool]
OnProgress = Callable[[int, int], None]
#: What an explanation reports as it goes: (phase, products done, products planned).
OnPhaseProgress = Callable[[str, int, int], None]

#: Default memory budget of one batched backward, in bytes (override per Explainer).
DEFAULT_VJP_MEMORY_BYTES = 1 << 30


def layer_activation_bytes(*, n_tokens: int, hidden: int, intermediate: int, heads: int, itemsize: int) -> int:
    """Bytes of what one layer saves for the backward pass of an ``n_tokens`` input: per token about 6 hidden-size
    vectors (residual, norms, q/k/v/o), 3 intermediate-size ones (gate, up, product) and a row of attention weights
    per head (twice: the weights and their softmax input)."""
    return n_tokens * (6 * hidden + 3 * intermediate + 2 * heads * n_tokens) * itemsize


def vjp_chunk_size(
    *, n_tokens: int, hidden: int, intermediate: int, layers: int, heads: int, itemsize: int, budget: int
) -> int:
    """How many VJPs to batch so that one batched backward stays within ``budget`` bytes.

    Per cotangent this counts the gradients of every saved activation of every layer. That is deliberately generous
    (the backward frees each layer's gradients as it goes: :func:`explanation_memory` measures what is really
    alive); the budget, not the estimate, is what a deployment tunes.
    """
    per_vjp = layers * layer_activation_bytes(
        n_tokens=n_tokens, hidden=hidden, intermediate=intermediate, heads=heads, itemsize=itemsize
    )
    return max(1, min(hidden, budget // max(per_vjp, 1)))


#: Layers' worth of activation gradients alive per cotangent while a batched backward runs. Measured on SmolLM2
#: (docs/reliability.md): 0.7 layers' worth with 8 tokens and 0.25 with 64 (576 VJPs in one batch); 1 keeps the
#: estimate an upper bound.
BACKWARD_LAYERS_ALIVE = 1


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory one explanation needs beyond the loaded model, by part, in bytes. An upper bound by design (the
    parts are added although some are alive at different times), checked before any work starts."""

    #: The linear twin's forward graph, kept for every VJP (twice with the ordinary contrast).
    graph: int
    #: One batched backward: ``vjps`` cotangents at once.
    batch: int
    #: Full Jacobians (hidden x tokens x hidden each) held at once, with their copies (SVD input, returned arrays).
    jacobians: int
    #: Cotangents in the largest batch this estimate assumes.
    vjps: int

    @property
    def total(self) -> int:
        return self.graph + self.batch + self.jacobians

    def describe(self) -> str:
        mib = 1024 * 1024
        return (
            f"about {self.total / mib:.0f} MiB (forward graph {self.graph / mib:.0f}, a batch of {self.vjps} VJPs "
            f"{self.batch / mib:.0f}, Jacobians {self.jacobians / mib:.0f})"
        )


def explanation_memory(
    *,
    n_tokens: int,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    itemsize: int,
    graphs: int,
    batch_vjps: int,
    jacobians: int,
) -> MemoryEstimate:
    """The memory of an explanation of ``n_tokens`` tokens that keeps ``graphs`` forward graphs, runs batches of
    up to ``batch_vjps`` cotangents and holds ``jacobians`` full Jacobians at once (see ModelContext.memory_estimate,
    which counts these for a request's options). One home for the arithmetic, so that admission, and any path that
    picks a cheaper method when this is too large, agree."""
    activations = layer_activation_bytes(
        n_tokens=n_tokens, hidden=hidden, intermediate=intermediate, heads=heads, itemsize=itemsize
    )
    return MemoryEstimate(
        graph=graphs * layers * activations,
        batch=batch_vjps * BACKWARD_LAYERS_ALIVE * activations,
        jacobians=jacobians * hidden * n_tokens * hidden * itemsize,
        vjps=batch_vjps,
    )


def full_jacobian(
    y: torch.Tensor,
    x: torch.Tensor,
    *,
    chunk: int,
    should_stop: ShouldStop | None = None,
    on_progress: OnProgress | None = None,
    retain_graph: bool = False,
) -> torch.Tensor:
    """Return J with J[k, i, :] = dy_k / dx_i, shape (d_out, n, d_in), from d_out VJPs in batches of ``chunk``.

    ``y`` must be the (d_out,) output of a graph built from ``x`` (which requires grad). ``should_stop`` is polled
    between batches; when it returns True the graph is released and :class:`ExplanationCancelled` is raised.
    """
    (jacobian,) = full_jacobians(
        y, [x], chunk=chunk, should_stop=should_stop, on_progress=on_progress, retain_graph=retain_graph
    )
    return jacobian


def full_jacobians(
    y: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    *,
    chunk: int,
    should_stop: ShouldStop | None = None,
    on_progress: OnProgress | None = None,
    retain_graph: bool = False,
) -> list[torch.Tensor]:
    """The Jacobians of ``y`` with respect to several tensors of its graph at once, from the same d_out VJPs.

    One VJP from y_k yields dy_k/dz for every tensor z it passes through, so asking for the input embeddings and,
    say, a layer's input together costs nothing extra: result[j][k] = dy_k / d inputs[j].
    """
    d_out = y.shape[0]
    jacobians = [torch.empty((d_out, *z.shape), dtype=z.dtype, device=z.device) for z in inputs]
    for start in range(0, d_out, chunk):
        if should_stop is not None and should_stop():
            raise ExplanationCancelled("explanation cancelled while computing the Jacobian")
        stop = min(start + chunk, d_out)
        basis = torch.zeros((stop - start, d_out), dtype=y.dtype, device=y.device)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1
        last = stop == d_out
        rows = torch.autograd.grad(
            y, list(inputs), grad_outputs=basis, is_grads_batched=True, retain_graph=retain_graph or not last
        )
        for jacobian, row in zip(jacobians, rows, strict=True):
            jacobian[start:stop] = row
        if on_progress is not None:
            on_progress(stop, d_out)
    return jacobians


def cotangent_products(
    y: torch.Tensor, x: torch.Tensor, cotangents: torch.Tensor, *, retain_graph: bool
) -> torch.Tensor:
    """Return w_t^T J_i for each row w_t of ``cotangents`` (T, d_out): shape (T, n, d_in), one batched backward."""
    if cotangents.shape[0] == 1:  # a plain backward is cheaper than a batch of one
        (product,) = torch.autograd.grad(y, x, grad_outputs=cotangents[0].to(y.dtype), retain_graph=retain_graph)
        return product[None]
    (products,) = torch.autograd.grad(
        y, x, grad_outputs=cotangents.to(y.dtype), is_grads_batched=True, retain_graph=retain_graph
    )
    return products
