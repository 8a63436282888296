"""Jacobians of the linear twin: the full matrix in memory-bounded batches, or just the products an answer needs.

The twin's output y (d numbers) is an exact linear function of the input embeddings X (n x d). Row k of the full
Jacobian — dy_k/dX for every position at once — is one vector-Jacobian product (VJP) with the basis vector e_k, so
the whole of J costs d VJPs however long the prompt is. They run against one retained forward graph, ``chunk`` at a
time as one batched backward (``is_grads_batched``, i.e. vmap over the backward), which bounds peak memory by the
chunk rather than by d. Attributions need far less: w . J_i x_i for all i is the single VJP with cotangent w.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from linlens.engine.frozen_attention import BLOCK_ELEMENTS, KEEP_WHOLE_ELEMENTS


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


def retained_layer_bytes(
    *, n_tokens: int, hidden: int, intermediate: int, heads: int, attention_width: int, kv_width: int, itemsize: int
) -> int:
    """Bytes one layer of the linear twin keeps alive after its forward pass over ``n_tokens`` tokens, its frozen
    coefficients included (the coefficient tape and the graph share them). Per token: the frozen attention's query
    and keys (the keys as recorded and expanded to the query heads), 2 intermediate-size vectors (the frozen gate and
    the product the down projection saves) and 6 hidden-size ones (the norms' inputs and outputs, the attention's
    output, the residual; generous, because at a few hundred tokens tensors below glibc's mmap threshold stay in the
    heap and the resident peak runs above the live tensors). The softmax weights themselves are kept only while they
    are few (at most KEEP_WHOLE_ELEMENTS: engine/frozen_attention.py recomputes larger ones from q and k). Measured
    against it in docs/reliability.md."""
    whole = min(heads * n_tokens * n_tokens, KEEP_WHOLE_ELEMENTS)
    return (n_tokens * (2 * attention_width + kv_width + 2 * intermediate + 6 * hidden) + whole) * itemsize


@dataclass(frozen=True)
class Geometry:
    """What the memory arithmetic needs to know of a model and an input (ModelContext fills it in)."""

    n_tokens: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    itemsize: int
    #: Query heads x head size: the width of one position's attention values after grouped-query expansion.
    attention_width: int
    #: Key/value heads x head size: one position's cached keys (and, as many, values) in one layer.
    kv_width: int
    #: The vocabulary (the prediction's logits and probabilities, the decoded tokens' scores).
    vocab: int = 0

    def layer(self) -> int:
        """:func:`layer_activation_bytes` of this input: one layer's activation gradients per cotangent."""
        return layer_activation_bytes(
            n_tokens=self.n_tokens,
            hidden=self.hidden,
            intermediate=self.intermediate,
            heads=self.heads,
            itemsize=self.itemsize,
        )

    def retained(self) -> int:
        """:func:`retained_layer_bytes` of this input."""
        return retained_layer_bytes(
            n_tokens=self.n_tokens,
            hidden=self.hidden,
            intermediate=self.intermediate,
            heads=self.heads,
            attention_width=self.attention_width,
            kv_width=self.kv_width,
            itemsize=self.itemsize,
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory one explanation needs beyond the loaded model, by part, in bytes. An upper bound by design (the
    parts are added although some are alive at different times), checked before any work starts."""

    #: The linear twin's forward graph with its frozen coefficients, kept for every VJP (more than one with the
    #: ordinary contrast), the keys and values of its cache, and one layer's attention scores while it runs.
    graph: int
    #: One batched backward: ``vjps`` cotangents at once.
    batch: int
    #: Full Jacobians (hidden x tokens x hidden each) held at once, with their copies (SVD input, returned arrays).
    jacobians: int
    #: Cotangents in the largest batch this estimate assumes.
    vjps: int
    #: Double-backward graphs (the reconstruction's JVP, kept through a whole-graph matrix-free solve; a layer map's):
    #: the cotangent side of each layer, far smaller than the forward graph since every coefficient is frozen.
    double_backward: int = 0
    #: The last position's own graph: the copy of the prefix's keys and values its cache makes when the last token
    #: joins it, one batch of its rows' value gradients over the whole prefix, and its d x d Jacobian with copies.
    position: int = 0
    #: Matrix-free solves: every iteration's block of rows (the map's input size each) kept for the Rayleigh-Ritz
    #: step, their concatenation, the SVD's copy, workspace and right factor (the whole-prompt map's rows are tokens
    #: x hidden): six times the rows, measured 4.9 times for the whole-prompt map at 256 tokens of SmolLM2.
    krylov: int = 0

    @property
    def total(self) -> int:
        return self.graph + self.batch + self.jacobians + self.double_backward + self.position + self.krylov

    def describe(self) -> str:
        mib = 1024 * 1024
        return (
            f"about {self.total / mib:.0f} MiB (forward graph {self.graph / mib:.0f}, a batch of {self.vjps} VJPs "
            f"{self.batch / mib:.0f}, Jacobians {self.jacobians / mib:.0f}, double-backward graphs "
            f"{self.double_backward / mib:.0f}, the last position's graph {self.position / mib:.0f}, Krylov rows "
            f"{self.krylov / mib:.0f})"
        )


def explanation_memory(
    geometry: Geometry,
    *,
    graphs: int,
    batch_vjps: int,
    jacobians: int,
    double_backward: int = 0,
    position_rows: int | None = None,
    krylov_rows: int = 0,
) -> MemoryEstimate:
    """The memory of an explanation that keeps ``graphs`` forward graphs and ``double_backward`` double-backward
    graphs, runs batches of up to ``batch_vjps`` cotangents on the whole graph and holds ``jacobians`` full Jacobians
    at once; with ``position_rows`` it also runs batches of that many rows on the last position's own graph, and
    its matrix-free solves keep ``krylov_rows`` floats of Krylov rows (see
    ModelContext.memory_estimate, which counts these for a request's options). One home for the arithmetic, so that
    admission, and any path that picks a cheaper method when this is too large, agree.

    Measured against it in docs/reliability.md (``scripts/bench_memory.py``)."""
    g = geometry
    n, layers, size = g.n_tokens, g.layers, g.itemsize
    # The cache's keys and values (the position graph's prefix); the attention masks transformers builds once per
    # pass (a full and a sliding one at most, kept by every layer's frozen attention); and, while one product runs
    # through a layer, one block of its recomputed softmax weights with the scores and masked copy behind it.
    cache = layers * n * 2 * g.kv_width * size
    scores = 2 * n * n * size + 3 * BLOCK_ELEMENTS * size
    # The served model's own prediction pass (no graph: one layer's activations at a time) and the logits it and
    # the decoding of singular vectors take over the vocabulary, in float32 and the explanation's precision.
    prediction = g.layer() + 8 * g.vocab * max(size, 4)
    position = 0
    if position_rows is not None:
        copy = layers * n * 2 * g.kv_width * size
        # A batched VJP through attention at the last position computes each row's gradient of the values of every
        # position (the prefix's are then dropped), before and after the grouped-query expansion, next to the
        # activation gradients at the one position of two layers (measured: 576 rows of SmolLM2 at 7 tokens, 44 MiB).
        one = 2 * dataclasses.replace(g, n_tokens=1).layer()
        rows = position_rows * (n * (g.attention_width + g.kv_width) * size + one)
        # J_n (d x d), its copy for the SVD, the SVD's factors and workspace.
        position = copy + rows + 5 * g.hidden * g.hidden * size
    return MemoryEstimate(
        graph=graphs * layers * g.retained() + cache + scores + prediction,
        batch=batch_vjps * BACKWARD_LAYERS_ALIVE * g.layer(),
        jacobians=jacobians * g.hidden * n * g.hidden * size,
        vjps=batch_vjps,
        double_backward=double_backward * layers * n * g.hidden * size,
        position=position,
        krylov=6 * krylov_rows * size,
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
