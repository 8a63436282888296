"""The spectra of one explanation: the selected positions' J_i and the whole-prompt map, by the plan's method.

:func:`~linlens.engine.explanation.explain_output` hands over here once the attributions and the reconstruction
are done; which function runs comes from the plan (:mod:`linlens.engine.plan`):

- :func:`last_position_spectra`: the last position alone, on its own graph (:mod:`linlens.engine.last_position`),
  or FULL from J_n already materialised by the layer chain;
- :func:`full_spectra`: FULL on the whole graph, every selected J_i from hidden_size VJPs, then SVDs (and the
  whole-prompt map, and the raw Jacobians when asked);
- :func:`matrix_free_spectra`: block Krylov on products with the whole graph, on the explanation's own
  double-backward graph, with certificates, exact term shares and estimated stable ranks.

Also the small pieces every explanation result is assembled from (:class:`Tally`, :func:`singular_components`,
:func:`position_spectra`), shared with explained generation steps (:mod:`linlens.engine.sequence`) and the layer
analysis.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch

from linlens.contract import (
    ExplainMethod,
    LinearMapSpectrum,
    PositionSelection,
    PositionSpectrum,
    SingularComponent,
    TokenScore,
)
from linlens.engine import jacobian as jac
from linlens.engine.forward import ExplanationPass
from linlens.engine.last_position import chain_products, full_spectrum, materialised_spectrum, matrix_free_spectrum
from linlens.engine.matrix_free import BlockMaps, Cancelled, Triplets, top_singular_triplets
from linlens.engine.plan import matrix_free_products
from linlens.engine.products import GraphProducts
from linlens.engine.spectra import Spectrum, decompose, exact_residuals, from_triplets, truncated_relative_errors


def relative(error: torch.Tensor, reference: torch.Tensor) -> float:
    """||error|| / ||reference|| in float64."""
    return float(error.double().norm() / reference.double().norm().clamp_min(1e-300))


def numpy(tensor: torch.Tensor) -> np.ndarray:
    """A detached CPU copy as numpy, in the tensor's own precision."""
    return tensor.detach().cpu().numpy().copy()


def ms(seconds: float) -> float:
    """Seconds as milliseconds (the unit of every reported timing)."""
    return seconds * 1000.0


def singular_components(
    spectrum: Spectrum,
    k: int,
    left_tokens: list[tuple[TokenScore, ...]],
    right_tokens: list[tuple[TokenScore, ...]],
    residuals: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[SingularComponent, ...]:
    """The top ``k`` singular triplets of ``spectrum`` with their decoded tokens and certificates."""
    return tuple(
        SingularComponent(
            rank=i + 1,
            value=float(spectrum.values[i]),
            left=numpy(spectrum.left[:, i]),
            right=numpy(spectrum.right[:, i]),
            left_tokens=left_tokens[i],
            right_tokens=right_tokens[i],
            residual_left=float(residuals[0][i]) if residuals is not None else 0.0,
            residual_right=float(residuals[1][i]) if residuals is not None else 0.0,
        )
        for i in range(k)
    )


@dataclasses.dataclass
class Tally:
    """Products and phase times of one explanation."""

    vjps: int = 0
    jvps: int = 0
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def timed(self, phase: str, started: float) -> None:
        self.timings[f"{phase}_ms"] = self.timings.get(f"{phase}_ms", 0.0) + ms(time.perf_counter() - started)


# -- the last position on its own graph ------------------------------------------------------------------------------


def last_position_spectra(
    p: ExplanationPass,
    method: ExplainMethod,
    tally: Tally,
    should_stop: jac.ShouldStop | None,
    on_progress: jac.OnPhaseProgress | None,
    last_jacobian: torch.Tensor | None = None,
) -> tuple[PositionSpectrum, ...]:
    """J_n's spectrum through the last position's own graph (:mod:`linlens.engine.last_position`), or (FULL) of
    ``last_jacobian``, J_n from the layer analysis's chain."""
    tick = time.perf_counter()
    graph = p.position_graph() if last_jacobian is None or method is not ExplainMethod.FULL else None
    tally.timed("forward", tick)
    tick = time.perf_counter()
    k, y, chunk = p.options.top_k, p.y.detach(), p.options.vjp_chunk_size or p.plan.chain_chunk
    if graph is None:
        assert last_jacobian is not None
        found = materialised_spectrum(last_jacobian, p.x.detach()[-1], y, k, vjps=int(last_jacobian.shape[1]))
    elif method is ExplainMethod.FULL:
        report = None
        if on_progress is not None:
            phase_progress = on_progress

            def report(done: int, total: int) -> None:
                phase_progress("jacobian", done, total)

        found = full_spectrum(graph, y, k, chunk=chunk, should_stop=should_stop, on_progress=report)
    else:
        progress = _Progress(on_progress, "spectra", int(chain_products(k)))
        found = matrix_free_spectrum(graph, y, k, chunk=chunk, should_stop=should_stop, on_products=progress)
        progress.finish()
    tally.vjps += found.vjps
    tally.jvps += found.jvps
    tally.timed("svd" if method is ExplainMethod.MATRIX_FREE else "jacobian", tick + found.svd_seconds)
    tally.timings["svd_ms"] = tally.timings.get("svd_ms", 0.0) + ms(found.svd_seconds)
    errors = None if found.complete else [found.stable_rank_error]
    return position_spectra(
        p, [p.n - 1], [found.spectrum], [found.residuals], tally, complete=found.complete, errors=errors
    )


# -- FULL: materialise the Jacobian, then SVDs -----------------------------------------------------------------------


def full_spectra(
    p: ExplanationPass,
    tally: Tally,
    should_stop: jac.ShouldStop | None,
    on_phase_progress: jac.OnPhaseProgress | None,
    reconstruction_error: float,
) -> tuple[tuple[PositionSpectrum, ...], tuple[float, ...], np.ndarray | None, LinearMapSpectrum | None]:
    options = p.options
    on_progress = None
    if on_phase_progress is not None:
        report = on_phase_progress

        def on_progress(done: int, total: int) -> None:
            report("jacobian", done, total)

    tick = time.perf_counter()
    with torch.enable_grad():
        full = jac.full_jacobian(
            p.y,
            p.x,
            chunk=p.vjp_chunk(),
            should_stop=should_stop,
            on_progress=on_progress,
            retain_graph=p.analyses_layers,
        )
    per_position = full.permute(1, 0, 2).contiguous()  # (n, d_out, d_in): per_position[i] = J_i
    del full
    tally.vjps += p.context.hidden_size
    tally.timed("jacobian", tick)
    xs, y = p.x.detach(), p.y.detach()
    spectra: tuple[PositionSpectrum, ...] = ()
    truncated: tuple[float, ...] = ()
    positions = list(options.selected_positions(p.n))
    if positions:
        tick = time.perf_counter()
        decomposed = decompose(per_position[positions], xs[positions], y, options.top_k)
        if options.positions is PositionSelection.ALL:
            truncated = tuple(truncated_relative_errors(decomposed, per_position, xs, p.constant, y))
        residuals = [
            exact_residuals(per_position[i], s, s.left.shape[-1]) for i, s in zip(positions, decomposed, strict=True)
        ]
        tally.timed("svd", tick)
        spectra = position_spectra(p, positions, decomposed, residuals, tally, complete=True, errors=None)
    prompt = None
    if options.prompt_spectrum and options.top_k > 0:
        tick = time.perf_counter()
        whole = per_position.permute(1, 0, 2).reshape(per_position.shape[1], -1)  # (d_out, n * d_in)
        (spectrum,) = decompose(whole[None], xs.reshape(1, -1), y, options.top_k)
        residual = exact_residuals(whole, spectrum, spectrum.left.shape[-1])
        tally.timed("svd", tick)
        prompt = _prompt_spectrum(p, spectrum, residual, tally, True, 0.0, reconstruction_error)
    jacobians = numpy(per_position) if options.include_jacobians else None
    return spectra, truncated, jacobians, prompt


# -- MATRIX_FREE: block Krylov on products ---------------------------------------------------------------------------


def matrix_free_spectra(
    p: ExplanationPass,
    graph: GraphProducts,
    tally: Tally,
    should_stop: jac.ShouldStop | None,
    on_progress: jac.OnPhaseProgress | None,
    reconstruction_error: float,
) -> tuple[tuple[PositionSpectrum, ...], tuple[float, ...], LinearMapSpectrum | None]:
    options = p.options
    n, d, k = p.n, p.context.hidden_size, options.top_k
    xs, y = p.x.detach(), p.y.detach()
    jvps_before, vjps_before = graph.jvps, graph.vjps  # the reconstruction's JVP is counted already
    positions = list(options.selected_positions(n))
    maps = len(positions) + (1 if options.prompt_spectrum else 0)
    progress = _Progress(on_progress, "spectra", int(matrix_free_products(k, maps)))
    tick = time.perf_counter()
    spectra: tuple[PositionSpectrum, ...] = ()
    truncated: tuple[float, ...] = ()
    try:
        # The exact terms J_i x_i: one JVP per position (all of them when every position is decomposed).
        wanted = list(range(n)) if options.positions is PositionSelection.ALL else positions
        tangents = torch.zeros((len(wanted), n, d), dtype=xs.dtype, device=xs.device)
        for row, i in enumerate(wanted):
            tangents[row, i] = xs[i]
        terms = dict(zip(wanted, graph.jvp(tangents), strict=True)) if wanted else {}
        if positions:
            triplets = _position_triplets(graph, positions, n, d, k, should_stop, progress)
            decomposed = [from_triplets(t, terms[i][None], y, k) for t, i in zip(triplets, positions, strict=True)]
            if options.positions is PositionSelection.ALL:
                stacked = torch.stack([terms[i] for i in range(n)])
                truncated = tuple(_truncated(decomposed, stacked, p.constant, y))
            tally.timed("svd", tick)
            spectra = position_spectra(
                p,
                positions,
                decomposed,
                [(t.residual_left, t.residual_right) for t in triplets],
                tally,
                complete=False,
                errors=[t.frobenius_sq_error / max(float(t.values[0]) ** 2, 1e-300) for t in triplets],
            )
        prompt = None
        if options.prompt_spectrum:
            tick = time.perf_counter()
            whole = BlockMaps(
                count=1,
                in_dim=n * d,
                out_dim=d,
                apply=lambda v: graph.jvp(v[0].reshape(-1, n, d))[None],
                apply_transposed=lambda u: graph.vjp(u[0]).reshape(1, -1, n * d),
                dtype=xs.dtype,
                device=xs.device,
            )
            (found,), _ = top_singular_triplets(whole, k, should_stop=should_stop, on_products=progress)
            image = y - p.constant
            spectrum = from_triplets(found, image[None], y, k)
            tally.timed("svd", tick)
            error = found.frobenius_sq_error / max(float(found.values[0]) ** 2, 1e-300)
            residuals = (found.residual_left, found.residual_right)
            prompt = _prompt_spectrum(p, spectrum, residuals, tally, False, error, reconstruction_error)
        progress.finish()
    except Cancelled:
        raise jac.ExplanationCancelled("explanation cancelled while computing the spectra") from None
    finally:
        tally.jvps += graph.jvps - jvps_before
        tally.vjps += graph.vjps - vjps_before
        graph.release()
    return spectra, truncated, prompt


def _position_triplets(
    graph: GraphProducts,
    positions: list[int],
    n: int,
    d: int,
    k: int,
    should_stop: jac.ShouldStop | None,
    progress: Callable[[int], None],
) -> list[Triplets]:
    """The top-k of every selected J_i in lockstep: one batched backward serves all positions."""
    count = len(positions)
    index = torch.tensor(positions)

    def apply(vectors: torch.Tensor) -> torch.Tensor:  # (P, b, d) -> (P, b, d)
        b = vectors.shape[1]
        tangents = vectors.new_zeros((count, b, n, d))
        tangents[torch.arange(count), :, index] = vectors
        return graph.jvp(tangents.reshape(count * b, n, d)).reshape(count, b, -1)

    def apply_transposed(vectors: torch.Tensor) -> torch.Tensor:  # (P, b, d) -> (P, b, d)
        b = vectors.shape[1]
        rows = graph.vjp(vectors.reshape(count * b, -1)).reshape(count, b, n, d)
        return rows[torch.arange(count), :, index]

    maps = BlockMaps(count, d, graph.out_dim, apply, apply_transposed, graph.out.dtype, graph.out.device)
    triplets, _ = top_singular_triplets(maps, k, should_stop=should_stop, on_products=progress)
    return triplets


def _truncated(spectra: list[Spectrum], terms: torch.Tensor, constant: torch.Tensor, y: torch.Tensor) -> list[float]:
    """||sum_i U_i^k U_i^k^T J_i x_i + c - y|| / ||y|| for k = 1..top_k, from the exact terms."""
    top_k = min(spectrum.left.shape[-1] for spectrum in spectra)
    errors = []
    for k in range(1, top_k + 1):
        truncated = sum(s.left[:, :k] @ (s.left[:, :k].T @ t) for s, t in zip(spectra, terms, strict=True))
        errors.append(float((truncated + constant - y).norm() / y.norm()))
    return errors


class _Progress:
    """Products done against an estimated total, for a progress bar (the total grows if the estimate was short)."""

    def __init__(self, on_progress: jac.OnPhaseProgress | None, phase: str, total: int) -> None:
        self.on_progress = on_progress
        self.phase = phase
        self.total = max(total, 1)
        self.done = 0

    def __call__(self, count: int) -> None:
        self.done += count
        self.total = max(self.total, self.done)
        if self.on_progress is not None:
            self.on_progress(self.phase, self.done, self.total)

    def finish(self) -> None:
        """The phase is over: the total becomes what was done (an estimate can be above it)."""
        if self.on_progress is not None and self.done < self.total:
            self.on_progress(self.phase, self.done, self.done)


# -- decoding ----------------------------------------------------------------------------------------------------------


def position_spectra(
    p: ExplanationPass,
    positions: list[int],
    decomposed: list[Spectrum],
    residuals: list[tuple[torch.Tensor, torch.Tensor]],
    tally: Tally,
    *,
    complete: bool,
    errors: list[float] | None,
) -> tuple[PositionSpectrum, ...]:
    options, decoder = p.options, p.decoder
    if not positions:
        return ()
    tick = time.perf_counter()
    # every position's vectors in one decode: reading the vocabulary matrix is what it costs
    ks = [min(options.top_k, spectrum.left.shape[-1]) for spectrum in decomposed]
    lefts, rights = decoder.both_tokens(
        torch.cat([s.left[:, :k] for s, k in zip(decomposed, ks, strict=True)], dim=1),
        torch.cat([s.right[:, :k] for s, k in zip(decomposed, ks, strict=True)], dim=1),
        options.tokens_per_vector,
    )
    results = []
    for slot, (position, spectrum) in enumerate(zip(positions, decomposed, strict=True)):
        k, first = ks[slot], sum(ks[:slot])
        left_tokens, right_tokens = lefts[first : first + k], rights[first : first + k]
        token_id = p.input_ids[position]
        results.append(
            PositionSpectrum(
                position=position,
                token_id=token_id,
                token_text=decoder.text(token_id),
                components=singular_components(spectrum, k, left_tokens, right_tokens, residuals[slot]),
                singular_values=numpy(spectrum.values),
                captured_share=tuple(float(v) for v in spectrum.captured_share[:k]),
                stable_rank=spectrum.stable_rank,
                term_norm=spectrum.term_norm,
                singular_values_complete=complete,
                stable_rank_error=errors[slot] if errors is not None else 0.0,
            )
        )
    tally.timed("decode", tick)
    return tuple(results)


def _prompt_spectrum(
    p: ExplanationPass,
    spectrum: Spectrum,
    residuals: tuple[torch.Tensor, torch.Tensor],
    tally: Tally,
    complete: bool,
    error: float,
    reconstruction_error: float,
) -> LinearMapSpectrum:
    """The whole-prompt map's triplets: right vectors as (n, d), decoded at the position holding most of each."""
    options, decoder = p.options, p.decoder
    tick = time.perf_counter()
    k = min(options.top_k, spectrum.left.shape[-1])
    n, d = p.n, p.context.hidden_size
    rights = spectrum.right[:, :k].T.reshape(k, n, d)
    dominant = rights.norm(dim=-1).argmax(dim=-1)  # (k,)
    left_tokens, right_tokens = decoder.both_tokens(
        spectrum.left[:, :k], rights[torch.arange(k), dominant].T, options.tokens_per_vector
    )
    components = tuple(
        dataclasses.replace(c, right=numpy(rights[i]))
        for i, c in enumerate(singular_components(spectrum, k, left_tokens, right_tokens, residuals))
    )
    tally.timed("decode", tick)
    return LinearMapSpectrum(
        components=components,
        singular_values=numpy(spectrum.values),
        captured_share=tuple(float(v) for v in spectrum.captured_share[:k]),
        stable_rank=spectrum.stable_rank,
        term_norm=spectrum.term_norm,
        reconstruction_error=reconstruction_error,
        singular_values_complete=complete,
        stable_rank_error=error,
    )


__all__ = [
    "Tally",
    "full_spectra",
    "last_position_spectra",
    "matrix_free_spectra",
    "ms",
    "numpy",
    "position_spectra",
    "relative",
    "singular_components",
]
