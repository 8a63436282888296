"""Every explained step's last-position spectrum at once: one batched position graph, the steps' maps in lockstep.

Step k's J_k is its last position's own map (:mod:`linlens.engine.position_graph`): the token at n_k - 1 alone on
its prefix's frozen keys and values. The K steps' tokens run through the twin as one batch of K rows, each on its own
prefix of the shared cache: the prefixes are left-padded to the longest and the padding is masked by transformers'
own attention mask (left padding keeps every query-key distance, so sliding windows see what they would see
unpadded; each row's position id is its true position). Nothing mixes rows of a batch (norms, MLPs, routers act per
token, attention reads its own row's keys), so y_k depends on x_k alone, and one batched backward with the cotangent
u_k in row k gives every J_k^T u_k at once; likewise one double-backward JVP every J_k v_k. A pass through one
position is bound by reading the weights, so K rows cost far less than K passes:

- FULL: d VJP rows, each with the same unit cotangent in every row, give every J_k, then one SVD per step;
- MATRIX_FREE: block Krylov on the K maps in lockstep (:func:`~linlens.engine.matrix_free.top_singular_triplets`
  with ``count`` K), each map certified on its own.

Each step's spectrum equals its own position graph's (tests/test_sequence.py: 1e-12 in float64 on every family).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from linlens.contract import ExplainMethod
from linlens.engine import jacobian as jac
from linlens.engine.last_position import LastPositionSpectrum, chain_products, solve_on_chain
from linlens.engine.matrix_free import BlockMaps
from linlens.engine.position_graph import KeyValues
from linlens.engine.products import GraphProducts
from linlens.engine.spectra import decompose, exact_residuals, from_triplets


@dataclass
class BatchedPositionGraph:
    """The K steps' last positions as one batch: ``y`` (K, d) from the leaf ``x`` (K, d), row k on prefix k."""

    x: torch.Tensor
    y: torch.Tensor
    seconds: float


def build_batched_position_graph(
    twin: PreTrainedModel, xs: torch.Tensor, cache: list[KeyValues], prefixes: list[int]
) -> BatchedPositionGraph:
    """Run the inputs ``xs`` (K, d), row k at position ``prefixes[k]`` on the first ``prefixes[k]`` positions of
    ``cache`` (every layer's detached keys and values of the longest sequence), through ``twin`` as one batch."""
    started = time.perf_counter()
    count, longest = len(prefixes), max(prefixes)
    padded = []
    for keys, values in cache:
        k_rows = keys.new_zeros((count, keys.shape[1], longest, keys.shape[3]))
        v_rows = values.new_zeros((count, values.shape[1], longest, values.shape[3]))
        for row, length in enumerate(prefixes):
            if length:
                k_rows[row, :, longest - length :] = keys[0, :, :length]
                v_rows[row, :, longest - length :] = values[0, :, :length]
        padded.append((k_rows, v_rows))
    mask = torch.zeros((count, longest + 1), dtype=torch.long, device=xs.device)
    for row, length in enumerate(prefixes):
        mask[row, longest - length :] = 1
    x = xs.detach().clone().requires_grad_(True)
    positions = torch.tensor(prefixes, device=xs.device)[:, None]
    with torch.enable_grad():
        out = twin.base_model(
            inputs_embeds=x[:, None],
            cache=DynamicCache(ddp_cache_data=padded),
            use_cache=True,
            attention_mask=mask,
            position_ids=positions,
            cache_position=torch.tensor([longest], device=xs.device),
        )
    return BatchedPositionGraph(x=x, y=out.last_hidden_state[:, -1], seconds=time.perf_counter() - started)


def step_spectra(
    graph: BatchedPositionGraph,
    ys: torch.Tensor,
    k: int,
    method: ExplainMethod,
    *,
    chunk: int,
    should_stop: jac.ShouldStop | None = None,
    on_progress: jac.OnPhaseProgress | None = None,
) -> list[LastPositionSpectrum]:
    """Every step's top ``k`` of J_k by ``method`` (signs along its y, a row of ``ys``), with certificates. The
    product counts are per map (what each step's own solve would report for the same iterations)."""
    if method is ExplainMethod.FULL:
        return _full(graph, ys, k, chunk, should_stop, on_progress)
    return _matrix_free(graph, ys, k, chunk, should_stop, on_progress)


def _full(
    graph: BatchedPositionGraph,
    ys: torch.Tensor,
    k: int,
    chunk: int,
    should_stop: jac.ShouldStop | None,
    on_progress: jac.OnPhaseProgress | None,
) -> list[LastPositionSpectrum]:
    """Every J_k from d VJP rows (row j: the unit cotangent e_j in every step's row), then one SVD per step."""
    count, d = graph.y.shape
    rows = []
    for start in range(0, d, max(chunk, 1)):
        if should_stop is not None and should_stop():
            raise jac.ExplanationCancelled("explanation cancelled while computing the Jacobians")
        stop = min(start + chunk, d)
        cotangents = graph.y.new_zeros((stop - start, count, d))
        cotangents[torch.arange(stop - start), :, torch.arange(start, stop)] = 1.0
        with torch.enable_grad():
            (block,) = torch.autograd.grad(
                graph.y, graph.x, grad_outputs=cotangents, is_grads_batched=True, retain_graph=True
            )
        rows.append(block)
        if on_progress is not None:
            on_progress("jacobian", stop, d)
    jacobians = torch.cat(rows).permute(1, 0, 2)  # (K, d_out, d_in): jacobians[k] = J_k
    found = []
    xs = graph.x.detach()
    for step in range(count):
        started = time.perf_counter()
        (spectrum,) = decompose(jacobians[step][None], xs[step][None], ys[step], k)
        residuals = exact_residuals(jacobians[step], spectrum, spectrum.left.shape[-1])
        seconds = time.perf_counter() - started
        found.append(LastPositionSpectrum(spectrum, residuals, True, 0.0, vjps=d, jvps=0, svd_seconds=seconds))
    return found


def _matrix_free(
    graph: BatchedPositionGraph,
    ys: torch.Tensor,
    k: int,
    chunk: int,
    should_stop: jac.ShouldStop | None,
    on_progress: jac.OnPhaseProgress | None,
) -> list[LastPositionSpectrum]:
    """The K maps' top ``k`` by block Krylov in lockstep: each pass carries every map's block."""
    count, d = graph.y.shape
    products = GraphProducts(graph.y.reshape(-1), graph.x, chunk=chunk)

    def apply(vectors: torch.Tensor) -> torch.Tensor:  # (K, b, d) -> (K, b, d): J_k v
        return products.jvp(vectors.transpose(0, 1)).reshape(-1, count, d).transpose(0, 1)

    def apply_transposed(vectors: torch.Tensor) -> torch.Tensor:  # (K, b, d) -> (K, b, d): J_k^T u
        return products.vjp(vectors.transpose(0, 1).reshape(-1, count * d)).transpose(0, 1)

    maps = BlockMaps(count, d, d, apply, apply_transposed, graph.y.dtype, graph.y.device)
    done, expected = 0, chain_products(k) * count

    def report(products_done: int) -> None:
        nonlocal done
        done += products_done
        if on_progress is not None:
            on_progress("spectra", done, max(expected, done))

    report_products: Callable[[int], None] | None = report if on_progress is not None else None
    # every J_k x_k, whose captured shares are reported, rides in the start pass
    triplets, solve = solve_on_chain(maps, k, graph.x.detach()[:, None], products, should_stop, report_products)
    if on_progress is not None and done < expected:
        on_progress("spectra", done, done)  # the phase is over: its total is what it took
    assert solve.extra_images is not None
    found = []
    for step, found_step in enumerate(triplets):
        spectrum = from_triplets(found_step, solve.extra_images[step], ys[step], k)
        error = found_step.frobenius_sq_error / max(float(found_step.values[0]) ** 2, 1e-300)
        found.append(
            LastPositionSpectrum(
                spectrum,
                (found_step.residual_left, found_step.residual_right),
                False,
                error,
                vjps=solve.vjps // count,
                jvps=solve.jvps // count,
            )
        )
    return found


__all__ = ["BatchedPositionGraph", "build_batched_position_graph", "step_spectra"]
