"""The whole-output explanation of one prediction: exact attributions, the reconstruction, and the spectra.

Read off an :class:`~linlens.engine.forward.ExplanationPass`:

1. attributions: one batched VJP with a cotangent per target (an LM-head row, or the difference of two rows);
2. the reconstruction y = J x + c: J x from one JVP on the pass's graph, in every explanation (it certifies that
   every nonlinearity was frozen: a live one would add its derivative to the product). The JVP is the
   double-backward trick of :class:`~linlens.engine.products.GraphProducts` on the graph the attributions used:
   measured on SmolLM2 (7 tokens, one thread) 339 ms against 1,154 ms for a forward-mode pass through the frozen
   system, with bit-identical results, and no process-wide forward-mode lock;
3. the top-k singular triplets of the selected J_i, and optionally of the whole-prompt map [J_1 ... J_n], by one
   of two methods (:mod:`linlens.engine.plan`): FULL materialises the Jacobian (hidden_size VJPs) and takes its SVD;
   MATRIX_FREE runs block Krylov on products (:mod:`linlens.engine.matrix_free`), a few dozen whatever the width,
   with residual certificates, exact term shares (one JVP per position) and estimated stable ranks;
4. optionally the ordinary (not detached) Jacobian, for contrast.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch

from linlens.contract import (
    Attribution,
    AttributionTarget,
    ExplainMethod,
    Explanation,
    LinearMapSpectrum,
    OrdinaryContrast,
    PositionSelection,
    PositionSpectrum,
    Reconstruction,
    SingularComponent,
    Timings,
    TokenScore,
)
from linlens.engine import jacobian as jac
from linlens.engine.context import Prediction
from linlens.engine.decode import TokenDecoder
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


def _ms(seconds: float) -> float:
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
class _Tally:
    """Products and phase times of one explanation."""

    vjps: int = 0
    jvps: int = 0
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def timed(self, phase: str, started: float) -> None:
        self.timings[f"{phase}_ms"] = self.timings.get(f"{phase}_ms", 0.0) + _ms(time.perf_counter() - started)


def explain_output(
    p: ExplanationPass,
    *,
    should_stop: jac.ShouldStop | None = None,
    on_progress: jac.OnPhaseProgress | None = None,
    last_jacobian: torch.Tensor | None = None,
) -> Explanation:
    """Explain the prediction of ``p`` (see the module docstring). The layer analysis, if any, is not included;
    ``last_jacobian``: J_n already materialised by it (its layer chain: d rows, counted here too), for a FULL
    last-position spectrum."""
    context, options = p.context, p.options
    prediction = p.prediction
    y_model = prediction.y_model
    d = context.hidden_size
    y = p.y.detach()
    tally = _Tally(timings={"forward_ms": _ms(p.seconds)})
    method = p.plan.method

    # 1. Exact attributions: one batched VJP with a cotangent per target (logit rows, or differences of rows).
    tick = time.perf_counter()
    targets = (AttributionTarget(prediction.explained.token_id), *options.attribution_targets)
    directions = torch.stack(
        [p.head[t.token_id] - (p.head[t.contrast_token_id] if t.contrast_token_id is not None else 0) for t in targets]
    )
    # The explained token's row w^T J is the double-backward graph's own g(u) = J^T u at u = w (one differentiable
    # backward serves the attribution and, next, the reconstruction's JVP); further targets take one batched VJP.
    graph = GraphProducts(p.y, p.x, chunk=p.vjp_chunk(), seed=directions[0])
    first = graph.transposed().detach()[None]
    with torch.enable_grad():
        rest = jac.cotangent_products(p.y, p.x, directions[1:], retain_graph=True) if len(targets) > 1 else first[:0]
    products = torch.cat([first, rest])
    per_token = (products * p.x.detach()[None]).sum(dim=-1)  # (T, n)
    attributions = [
        attribution(context.decoder, target, direction, row, y_model, p.constant)
        for target, direction, row in zip(targets, directions, per_token, strict=True)
    ]
    tally.vjps += len(targets)
    tally.timed("attribution", tick)

    # 2. The reconstruction y = J x + c, from one JVP along x on the retained graph (see the module docstring); a
    # matrix-free solve goes on with the same double-backward graph.
    tick = time.perf_counter()
    y_linear = graph.jvp(p.x.detach()[None])[0] + p.constant
    tally.jvps += 1
    if method is not ExplainMethod.MATRIX_FREE:
        graph.release()
    reconstruction = reconstructed(y_linear, y, prediction, p.head, logits_of_y=p.logits_of_y)
    tally.timed("reconstruction", tick)

    # 3. The spectra, by the chosen method: the last position alone on its own graph, else on the whole graph.
    spectra: tuple[PositionSpectrum, ...] = ()
    truncated: tuple[float, ...] = ()
    jacobians_out: np.ndarray | None = None
    prompt: LinearMapSpectrum | None = None
    if method is not None and p.plan.on_position_graph:
        graph.release()
        spectra = _last_position(p, method, tally, should_stop, on_progress, last_jacobian)
    elif method is ExplainMethod.FULL:
        spectra, truncated, jacobians_out, prompt = _full(
            p, tally, should_stop, on_progress, reconstruction.relative_error_vs_detached
        )
    elif method is ExplainMethod.MATRIX_FREE:
        spectra, truncated, prompt = _matrix_free(
            p, graph, tally, should_stop, on_progress, reconstruction.relative_error_vs_detached
        )

    # 4. The ordinary Jacobian for contrast: same arithmetic, nothing detached, so it does not reconstruct y.
    ordinary: OrdinaryContrast | None = None
    if options.ordinary_contrast:
        tick = time.perf_counter()
        plain = context.twin(options.precision, None)
        x_plain = p.x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            y_plain = plain.base_model(inputs_embeds=x_plain[None], use_cache=False).last_hidden_state[0, -1]
            full = jac.full_jacobian(y_plain, x_plain, chunk=p.vjp_chunk(), should_stop=should_stop)
        y_ordinary = torch.einsum("ond,nd->o", full, x_plain.detach())
        ordinary = OrdinaryContrast(
            relative_error_vs_model=relative(y_ordinary.double() - y_model.double(), y_model),
            predicts_same_token=int(torch.argmax(p.head @ y_ordinary)) == prediction.predicted.token_id,
        )
        del full
        tally.vjps += d
        tally.timed("ordinary", tick)

    return assemble(
        p,
        reconstruction,
        attributions,
        spectra,
        tally,
        truncated=truncated,
        jacobians=jacobians_out,
        ordinary=ordinary,
        prompt_spectrum=prompt,
    )


def attribution(
    decoder: TokenDecoder,
    target: AttributionTarget,
    direction: torch.Tensor,
    row: torch.Tensor,
    y_model: torch.Tensor,
    constant: torch.Tensor,
) -> Attribution:
    """One target's exact attribution from its per-token row ``direction^T J_i x_i``: the target's total is read off
    the served model's own y (not the row's sum), so ``error`` is a real check that the row and c make it up."""
    total = float(direction.to(y_model.dtype) @ y_model)
    constant_part = float(direction @ constant)
    error = abs(float(row.sum()) + constant_part - total) / max(abs(total), 1e-30)
    label = decoder.text(target.token_id)
    if target.contrast_token_id is not None:
        label = f"{label} vs {decoder.text(target.contrast_token_id)}"
    return Attribution(target, label, numpy(row), constant_part, total, error)


def reconstructed(
    y_linear: torch.Tensor,
    y: torch.Tensor,
    prediction: Prediction,
    head: torch.Tensor,
    *,
    logits_of_y: torch.Tensor | None = None,
) -> Reconstruction:
    """How y_linear = J x + c compares with the served model's y and logits and with the detached twin's y.

    ``logits_of_y``: W y, already read off the LM head with the prediction's logits (ExplanationPass). Where J x + c
    is y bit for bit (a bias-free model in its served precision, usually) they are y_linear's logits too, and the
    LM head (113 MB for SmolLM2, 5% of a 7-token explanation) is not read a second time; elsewhere W y_linear is
    computed."""
    y_model, logits = prediction.y_model, prediction.logits
    same = logits_of_y is not None and y_linear.dtype == y.dtype and torch.equal(y_linear, y)
    logits_linear = logits_of_y if same and logits_of_y is not None else head @ y_linear
    linear_id = int(torch.argmax(logits_linear))
    return Reconstruction(
        relative_error_vs_model=relative(y_linear.double() - y_model.double(), y_model),
        relative_error_vs_detached=relative(y_linear - y, y),
        max_abs_logit_error=float((logits_linear.double() - logits.double()).abs().max()),
        predicts_same_token=linear_id == prediction.predicted.token_id,
        linear_token_id=linear_id,
    )


def assemble(
    p: ExplanationPass,
    reconstruction: Reconstruction,
    attributions: list[Attribution],
    spectra: tuple[PositionSpectrum, ...],
    tally: _Tally,
    *,
    truncated: tuple[float, ...] = (),
    jacobians: np.ndarray | None = None,
    ordinary: OrdinaryContrast | None = None,
    prompt_spectrum: LinearMapSpectrum | None = None,
) -> Explanation:
    """The Explanation of pass ``p`` from its parts (one home for the result's shape: a whole explanation and an
    explained generation's step build it here)."""
    prediction = p.prediction
    return Explanation(
        input_ids=p.input_ids,
        input_tokens=p.context.decoder.texts(list(p.input_ids)),
        predicted=prediction.predicted,
        explained=prediction.explained,
        y=numpy(prediction.y_model.to(p.dtype)),
        constant=numpy(p.constant),
        has_bias=p.context.has_bias,
        reconstruction=reconstruction,
        attributions=tuple(attributions),
        spectra=spectra,
        truncated_relative_error=truncated,
        jacobians=jacobians,
        ordinary=ordinary,
        precision=p.options.precision,
        gate_mode=p.options.gate_mode,
        timings=Timings(**tally.timings, total_ms=sum(tally.timings.values())),
        vjp_count=tally.vjps,
        method=p.plan.method,
        jvp_count=tally.jvps,
        prompt_spectrum=prompt_spectrum,
    )


# -- the last position on its own graph ------------------------------------------------------------------------------


def _last_position(
    p: ExplanationPass,
    method: ExplainMethod,
    tally: _Tally,
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
    tally.timings["svd_ms"] = tally.timings.get("svd_ms", 0.0) + _ms(found.svd_seconds)
    errors = None if found.complete else [found.stable_rank_error]
    return _position_spectra(
        p, [p.n - 1], [found.spectrum], [found.residuals], tally, complete=found.complete, errors=errors
    )


# -- FULL: materialise the Jacobian, then SVDs -----------------------------------------------------------------------


def _full(
    p: ExplanationPass,
    tally: _Tally,
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
        spectra = _position_spectra(p, positions, decomposed, residuals, tally, complete=True, errors=None)
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


def _matrix_free(
    p: ExplanationPass,
    graph: GraphProducts,
    tally: _Tally,
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
            spectra = _position_spectra(
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


def _position_spectra(
    p: ExplanationPass,
    positions: list[int],
    decomposed: list[Spectrum],
    residuals: list[tuple[torch.Tensor, torch.Tensor]],
    tally: _Tally,
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
    tally: _Tally,
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
    "assemble",
    "attribution",
    "explain_output",
    "from_triplets",
    "numpy",
    "reconstructed",
    "relative",
    "singular_components",
]
