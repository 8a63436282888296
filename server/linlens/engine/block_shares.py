"""The layers x tokens matrix: each attention / MLP block's share of the logit, split over the input tokens.

Block i's term t_i at the last position is a linear function of the input embeddings, and its share of the logit is
s . t_i (s the final norm's seed of the explained token), so token j's part of it is s . (d t_i / d x_j) x_j. Two
ways compute every entry exactly, and they cost differently:

- by cotangents: one batched VJP with the seed on each of the 2L block terms, ``2L`` rows through the whole graph
  (each row carries every position);
- by tangents: one batched JVP (the double-backward trick of :class:`~linlens.engine.products.GraphProducts`) with
  one tangent per token, x_j on position j and zero elsewhere: ``n`` tangents, each costing about ``JVP_WEIGHT``
  rows. Their images of every block term, dotted with s, are the matrix's columns, and their sum is the image
  M x of every recorded output: the layer analysis's reconstruction checks come with it for nothing.

A short prompt (SmolLM2: 7 tokens against 60 blocks) takes the tangents; a long one the cotangents. Both are checked
against each other and against forward passes of the frozen system (tests/test_engine_layers.py).
"""

from __future__ import annotations

import torch

from linlens.engine.plan import JVP_WEIGHT
from linlens.engine.products import GraphProducts


def by_tangents(n_tokens: int, blocks: int) -> bool:
    """Whether ``n_tokens`` tangents (plus the double-backward graph, about one row) cost less than ``blocks``
    cotangents on the whole graph."""
    return JVP_WEIGHT * n_tokens + 1 < blocks


def token_shares(
    outputs: torch.Tensor,
    x: torch.Tensor,
    seed: torch.Tensor,
    blocks: int,
    *,
    tangents: bool,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logit shares of the first ``blocks`` rows of ``outputs`` (m, d), computed on the graph of ``x``
    (n, d): shape (blocks, n), entry [i, j] = seed . (d outputs_i / d x_j) x_j.

    ``tangents`` picks the method (see the module docstring); by tangents it also returns M x for every row of
    ``outputs`` (m, d), by cotangents None. ``chunk`` bounds the products per batched backward."""
    if not tangents:
        terms = outputs[:blocks]
        cotangents = torch.zeros((blocks, *terms.shape), dtype=terms.dtype, device=terms.device)
        cotangents[torch.arange(blocks), torch.arange(blocks)] = seed
        with torch.enable_grad():
            (grads,) = torch.autograd.grad(terms, x, grad_outputs=cotangents, is_grads_batched=True, retain_graph=True)
        return (grads * x.detach()[None]).sum(dim=-1), None
    n, m = int(x.shape[0]), int(outputs.shape[0])
    graph = GraphProducts(outputs.reshape(-1), x, chunk=chunk)
    placed = torch.zeros((n, *x.shape), dtype=x.dtype, device=x.device)
    placed[torch.arange(n), torch.arange(n)] = x.detach()
    try:
        images = graph.jvp(placed).reshape(n, m, -1)  # [j, i]: M_ij x_j
    finally:
        graph.release()
    return (images[:, :blocks] @ seed).T, images.sum(dim=0)


__all__ = ["by_tangents", "token_shares"]
