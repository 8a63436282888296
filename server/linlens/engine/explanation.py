"""The whole-output explanation of one prediction: exact attributions, the reconstruction, and the spectra.

Read off an :class:`~linlens.engine.forward.ExplanationPass`:

1. attributions: one batched VJP with a cotangent per target (an LM-head row, or the difference of two rows);
2. the reconstruction y = J x + c: J x from one JVP on the pass's graph, in every explanation (it certifies that
   every nonlinearity was frozen: a live one would add its derivative to the product). The JVP is the
   double-backward trick of :class:`~linlens.engine.products.GraphProducts` on the graph the attributions used:
   measured on SmolLM2 (7 tokens, one thread) 339 ms against 1,154 ms for a forward-mode pass through the frozen
   system, with bit-identical results, and no process-wide forward-mode lock;
3. the top-k singular triplets of the selected J_i, and optionally of the whole-prompt map [J_1 ... J_n]
   (:mod:`linlens.engine.output_spectra`), by one of two methods (:mod:`linlens.engine.plan`): FULL materialises
   the Jacobian (hidden_size VJPs) and takes its SVD; MATRIX_FREE runs block Krylov on products
   (:mod:`linlens.engine.matrix_free`), a few dozen whatever the width, with residual certificates, exact term
   shares (one JVP per position) and estimated stable ranks;
4. optionally the ordinary (not detached) Jacobian, for contrast.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from linlens.contract import (
    Attribution,
    AttributionTarget,
    ExplainMethod,
    Explanation,
    LinearMapSpectrum,
    OrdinaryContrast,
    PositionSpectrum,
    Reconstruction,
    Timings,
)
from linlens.engine import jacobian as jac
from linlens.engine.context import Prediction
from linlens.engine.decode import TokenDecoder
from linlens.engine.forward import ExplanationPass
from linlens.engine.output_spectra import (
    Tally,
    full_spectra,
    last_position_spectra,
    matrix_free_spectra,
    ms,
    numpy,
    relative,
)
from linlens.engine.products import GraphProducts


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
    tally = Tally(timings={"forward_ms": ms(p.seconds)})
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
        spectra = last_position_spectra(p, method, tally, should_stop, on_progress, last_jacobian)
    elif method is ExplainMethod.FULL:
        spectra, truncated, jacobians_out, prompt = full_spectra(
            p, tally, should_stop, on_progress, reconstruction.relative_error_vs_detached
        )
    elif method is ExplainMethod.MATRIX_FREE:
        spectra, truncated, prompt = matrix_free_spectra(
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
    tally: Tally,
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


__all__ = ["assemble", "attribution", "explain_output", "reconstructed"]
