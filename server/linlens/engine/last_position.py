"""The last position's spectrum, from its own linear graph: cost independent of the prompt's length.

Products with J_n run on :class:`~linlens.engine.position_graph.PositionGraph` (one token through the twin on the
prefix's frozen keys and values) instead of the whole prompt's graph. Two methods, as for any map:

- FULL: J_n from d VJPs in batches of ``chunk`` (one batched backward each), then its SVD;
- MATRIX_FREE: block Krylov (:mod:`linlens.engine.matrix_free`) with a narrow block (:func:`chain_block`): a pass
  through one position costs a floor (reading every layer's weights, and autograd's bookkeeping) plus a little per
  row, and on SmolLM2 a block of 8 certifies its top 3 in 14 passes of 116 rows where 16 took 12 passes of 196.

Which one runs under AUTO comes from :func:`chain_costs`, a model of what each costs in passes and rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from linlens.contract import ExplainOptions
from linlens.engine import jacobian as jac
from linlens.engine.matrix_free import BlockMaps, Cancelled, Report, Triplets, top_singular_triplets
from linlens.engine.position_graph import PositionGraph
from linlens.engine.products import GraphProducts
from linlens.engine.spectra import Spectrum, decompose, exact_residuals, from_triplets

#: Krylov block width on the position graph, at least (k + oversampling above it). Measured on SmolLM2 (float32, one
#: thread, the top 3, the same certificate target, one process): 8 took 51 VJPs + 65 JVPs in 14 passes, 568 ms at
#: 7 tokens and 664 ms at 128; 12 took 75 + 97 in 14 passes, 636 ms at 7; 16 took 83 + 113 in 12 passes, 629 ms at
#: 7 and 839 ms at 128. A wider block saves a pass or two but pays more in rows than the passes cost, and more so
#: on a long prompt, where a row's backward also reaches the prefix's values.
CHAIN_BLOCK = 8
#: What one batched pass over the position graph costs beyond its rows, in rows: from the two solves above, a pass
#: costs about 28 ms and a row 1.5 ms (the pass is mostly the weights' read: 30 layers' value, output, up and down
#: projections, ~28 ms for 8 rows of plain matrix products on one thread, 36 for 16).
PASS_OVERHEAD_ROWS = 19.0
#: A double-backward JVP row against a VJP row on the same graph: measured on SmolLM2's position graph (float32, one
#: thread, 8 rows) as the same matrix products (120 of them, 35-36 ms either way), 47 against 49 ms a pass.
CHAIN_JVP_WEIGHT = 1.0
#: Growth passes (Krylov iterations) assumed ahead of a matrix-free solve on the position graph with a block of
#: CHAIN_BLOCK: SmolLM2's top 3 (sigma_3 / sigma_4 = 1.19) certify below 1e-5 after 6.
CHAIN_ITERATIONS = 6


@dataclass(frozen=True)
class ChainCosts:
    """Predicted costs, in VJP rows through the position graph, of the two methods for one last-position map."""

    full: float
    matrix_free: float


def chain_block(k: int) -> int:
    """The Krylov block width for the top ``k`` on the position graph."""
    return max(CHAIN_BLOCK, k + max(5, k))


def chain_costs(k: int, hidden: int, chunk: int, svd_rows: float) -> ChainCosts:
    """The cost model that AUTO compares: FULL pays hidden rows in ceil(hidden / chunk) passes plus the SVD
    (``svd_rows``: its time in rows, from the model's size), MATRIX_FREE pays (start, one per iteration) JVP passes
    and (one per iteration and the first, plus the narrow one of the right certificates) VJP passes of a block of
    :func:`chain_block` rows (the start pass carries the Frobenius probes too), JVP rows weighted."""
    passes = math.ceil(hidden / max(chunk, 1))
    full = hidden + passes * PASS_OVERHEAD_ROWS + svd_rows
    b = chain_block(k)
    jvp_rows = (2 * b + 1) + CHAIN_ITERATIONS * b + (1 + CHAIN_ITERATIONS) * PASS_OVERHEAD_ROWS
    vjp_rows = (1 + CHAIN_ITERATIONS) * (b + PASS_OVERHEAD_ROWS) + k + PASS_OVERHEAD_ROWS
    return ChainCosts(full=full, matrix_free=jvp_rows * CHAIN_JVP_WEIGHT + vjp_rows)


def chain_products(k: int) -> int:
    """Products a matrix-free top ``k`` on the position graph is expected to take (for progress bars)."""
    b = chain_block(k)
    return (2 * b + 1) + CHAIN_ITERATIONS * b + (1 + CHAIN_ITERATIONS) * b + k


def on_position_graph(options: ExplainOptions, n_tokens: int) -> bool:
    """Whether the spectra asked for are the last position's alone, so that its own graph serves them: not the
    whole-prompt map, not other positions, and no raw Jacobians (those cover every position)."""
    return (
        options.selected_positions(n_tokens) == (n_tokens - 1,)
        and not options.prompt_spectrum
        and not options.include_jacobians
    )


@dataclass(frozen=True)
class LastPositionSpectrum:
    """J_n's spectrum with its certificates and what it cost."""

    spectrum: Spectrum
    #: ||J v - s u|| / s and ||J^T u - s v|| / s per returned triplet.
    residuals: tuple[torch.Tensor, torch.Tensor]
    #: Whether every singular value is known (FULL), not only the top ones.
    complete: bool
    #: One standard error of the stable rank (matrix-free estimates ||J_n||_F); 0 when complete.
    stable_rank_error: float
    vjps: int
    jvps: int
    #: Seconds spent in the SVD of a materialised J_n (0 for matrix-free).
    svd_seconds: float = 0.0


def full_spectrum(
    graph: PositionGraph,
    y: torch.Tensor,
    k: int,
    *,
    chunk: int,
    should_stop: jac.ShouldStop | None = None,
    on_progress: jac.OnProgress | None = None,
) -> LastPositionSpectrum:
    """J_n materialised from d VJPs on the position graph, then its SVD (signs along ``y``)."""
    with torch.enable_grad():
        jn = jac.full_jacobian(
            graph.y, graph.x, chunk=chunk, should_stop=should_stop, on_progress=on_progress, retain_graph=True
        )
    return materialised_spectrum(jn, graph.x.detach(), y, k, vjps=int(graph.y.shape[0]))


def materialised_spectrum(
    jn: torch.Tensor, x_n: torch.Tensor, y: torch.Tensor, k: int, *, vjps: int
) -> LastPositionSpectrum:
    """The SVD of a materialised J_n (d, d) (signs along ``y``), with exact certificates; ``vjps``: the rows it
    took (the layer chain's J_n comes with the layer analysis's rows)."""
    started = time.perf_counter()
    (spectrum,) = decompose(jn[None], x_n[None], y, k)
    residuals = exact_residuals(jn, spectrum, spectrum.left.shape[-1])
    seconds = time.perf_counter() - started
    return LastPositionSpectrum(spectrum, residuals, True, 0.0, vjps=vjps, jvps=0, svd_seconds=seconds)


def solve_on_chain(
    maps: BlockMaps,
    k: int,
    extra: torch.Tensor,
    products: GraphProducts,
    should_stop: jac.ShouldStop | None,
    on_products: Callable[[int], None] | None,
) -> tuple[list[Triplets], Report]:
    """The top ``k`` of ``maps`` (one or several position graphs' J) by block Krylov with the chain's block, the
    ``extra`` vectors' images (the exact terms) in the start pass; the products' graph is released either way."""
    try:
        return top_singular_triplets(
            maps, k, oversample=chain_block(k) - k, extra=extra, should_stop=should_stop, on_products=on_products
        )
    except Cancelled:
        raise jac.ExplanationCancelled("explanation cancelled while computing the spectra") from None
    finally:
        products.release()


def matrix_free_spectrum(
    graph: PositionGraph,
    y: torch.Tensor,
    k: int,
    *,
    chunk: int,
    should_stop: jac.ShouldStop | None = None,
    on_products: Callable[[int], None] | None = None,
) -> LastPositionSpectrum:
    """The top ``k`` of J_n by block Krylov on the position graph, certified, with the exact term J_n x_n."""
    products = GraphProducts(graph.y, graph.x, chunk=chunk)
    d = int(graph.x.shape[0])
    maps = BlockMaps(
        count=1,
        in_dim=d,
        out_dim=products.out_dim,
        apply=lambda v: products.jvp(v[0])[None],
        apply_transposed=lambda u: products.vjp(u[0])[None],
        dtype=graph.y.dtype,
        device=graph.y.device,
    )
    # J_n x_n, whose captured shares are reported, rides in the start pass
    (found,), report = solve_on_chain(maps, k, graph.x.detach()[None, None], products, should_stop, on_products)
    assert report.extra_images is not None
    term = report.extra_images[0]  # (1, d)
    spectrum = from_triplets(found, term, y, k)
    error = found.frobenius_sq_error / max(float(found.values[0]) ** 2, 1e-300)
    return LastPositionSpectrum(
        spectrum,
        (found.residual_left, found.residual_right),
        False,
        error,
        vjps=products.vjps,
        jvps=products.jvps,
    )


__all__ = [
    "ChainCosts",
    "LastPositionSpectrum",
    "chain_block",
    "chain_costs",
    "chain_products",
    "full_spectrum",
    "materialised_spectrum",
    "matrix_free_spectrum",
    "on_position_graph",
]
