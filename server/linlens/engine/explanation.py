"""The whole-output explanation of one prediction: exact attributions, the Jacobians J_i and what they show.

Read off an :class:`~linlens.engine.forward.ExplanationPass`:

1. attributions: one batched VJP with a cotangent per target (an LM-head row, or the difference of two rows);
2. when the answer needs it (top_k > 0 or the raw Jacobians), the full Jacobian from d VJPs in memory-bounded
   batches, the reconstruction y = sum_i J_i x_i + c checked against the model, and the SVD of the selected J_i with
   their singular vectors decoded to tokens;
3. optionally the ordinary (not detached) Jacobian, for contrast.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from linlens.contract import (
    Attribution,
    AttributionTarget,
    Explanation,
    OrdinaryContrast,
    PositionSelection,
    PositionSpectrum,
    Reconstruction,
    SingularComponent,
    Timings,
    TokenScore,
)
from linlens.engine import jacobian as jac
from linlens.engine.forward import ExplanationPass
from linlens.engine.spectra import Spectrum, decompose, truncated_relative_errors


def relative(error: torch.Tensor, reference: torch.Tensor) -> float:
    """||error|| / ||reference|| in float64."""
    return float(error.double().norm() / reference.double().norm().clamp_min(1e-300))


def numpy(tensor: torch.Tensor) -> np.ndarray:
    """A detached CPU copy as numpy, in the tensor's own precision."""
    return tensor.detach().cpu().numpy().copy()


def singular_components(
    spectrum: Spectrum, k: int, left_tokens: list[tuple[TokenScore, ...]], right_tokens: list[tuple[TokenScore, ...]]
) -> tuple[SingularComponent, ...]:
    """The top ``k`` singular triplets of ``spectrum`` with their decoded tokens, as the contract's components."""
    return tuple(
        SingularComponent(
            rank=i + 1,
            value=float(spectrum.values[i]),
            left=numpy(spectrum.left[:, i]),
            right=numpy(spectrum.right[:, i]),
            left_tokens=left_tokens[i],
            right_tokens=right_tokens[i],
        )
        for i in range(k)
    )


def _ms(seconds: float) -> float:
    return seconds * 1000.0


def explain_output(
    p: ExplanationPass,
    *,
    should_stop: jac.ShouldStop | None = None,
    on_progress: jac.OnProgress | None = None,
) -> Explanation:
    """Explain the prediction of ``p`` (see the module docstring). The layer analysis, if any, is not included."""
    context, options = p.context, p.options
    prediction = p.prediction
    y_model, logits = prediction.y_model, prediction.logits
    d = context.hidden_size
    y = p.y.detach()
    timings: dict[str, float] = {"forward_ms": _ms(p.seconds)}
    need_full = options.needs_full_jacobian
    keep_graph = p.analyses_layers

    # 1. Exact attributions: one batched VJP with a cotangent per target (logit rows, or differences of rows).
    tick = time.perf_counter()
    targets = (AttributionTarget(prediction.explained.token_id), *options.attribution_targets)
    directions = torch.stack(
        [p.head[t.token_id] - (p.head[t.contrast_token_id] if t.contrast_token_id is not None else 0) for t in targets]
    )
    with torch.enable_grad():
        products = jac.cotangent_products(p.y, p.x, directions, retain_graph=need_full or keep_graph)
    per_token = (products * p.x.detach()[None]).sum(dim=-1)  # (T, n)
    attributions = []
    for target, direction, row in zip(targets, directions, per_token, strict=True):
        total = float(direction.to(y_model.dtype) @ y_model)
        constant_part = float(direction @ p.constant)
        error = abs(float(row.sum()) + constant_part - total) / max(abs(total), 1e-30)
        label = context.decoder.text(target.token_id)
        if target.contrast_token_id is not None:
            label = f"{label} vs {context.decoder.text(target.contrast_token_id)}"
        attributions.append(Attribution(target, label, numpy(row), constant_part, total, error))
    timings["attribution_ms"] = _ms(time.perf_counter() - tick)
    vjp_count = len(targets)

    # 2. The full Jacobian, when the answer needs it: d VJPs, batched to bound memory.
    reconstruction: Reconstruction | None = None
    spectra: tuple[PositionSpectrum, ...] = ()
    truncated: tuple[float, ...] = ()
    jacobians_out: np.ndarray | None = None
    if need_full:
        tick = time.perf_counter()
        with torch.enable_grad():
            full = jac.full_jacobian(
                p.y,
                p.x,
                chunk=p.vjp_chunk(),
                should_stop=should_stop,
                on_progress=on_progress,
                retain_graph=keep_graph,
            )
        per_position = full.permute(1, 0, 2).contiguous()  # (n, d_out, d_in): per_position[i] = J_i
        del full
        vjp_count += d
        timings["jacobian_ms"] = _ms(time.perf_counter() - tick)
        xs = p.x.detach()
        y_linear = torch.einsum("nod,nd->o", per_position, xs) + p.constant
        logits_linear = p.head @ y_linear
        linear_id = int(torch.argmax(logits_linear))
        reconstruction = Reconstruction(
            relative_error_vs_model=relative(y_linear.double() - y_model.double(), y_model),
            relative_error_vs_detached=relative(y_linear - y, y),
            max_abs_logit_error=float((logits_linear.double() - logits.double()).abs().max()),
            predicts_same_token=linear_id == prediction.predicted.token_id,
            linear_token_id=linear_id,
        )
        if options.top_k > 0:
            spectra, truncated = _spectra(p, per_position, timings)
        if options.include_jacobians:
            jacobians_out = numpy(per_position)
        del per_position

    # 3. The ordinary Jacobian for contrast: same arithmetic, nothing detached, so it does not reconstruct y.
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
        vjp_count += d
        timings["ordinary_ms"] = _ms(time.perf_counter() - tick)

    return Explanation(
        input_ids=p.input_ids,
        input_tokens=context.decoder.texts(list(p.input_ids)),
        predicted=prediction.predicted,
        explained=prediction.explained,
        y=numpy(y_model.to(p.dtype)),
        constant=numpy(p.constant),
        has_bias=context.has_bias,
        reconstruction=reconstruction,
        attributions=tuple(attributions),
        spectra=spectra,
        truncated_relative_error=truncated,
        jacobians=jacobians_out,
        ordinary=ordinary,
        precision=options.precision,
        gate_mode=options.gate_mode,
        timings=Timings(**timings, total_ms=sum(timings.values())),
        vjp_count=vjp_count,
    )


def _spectra(
    p: ExplanationPass, per_position: torch.Tensor, timings: dict[str, float]
) -> tuple[tuple[PositionSpectrum, ...], tuple[float, ...]]:
    """SVD of the selected J_i, their decoded singular vectors, and (for all positions) the rank-k truncation."""
    options, decoder = p.options, p.context.decoder
    xs, y = p.x.detach(), p.y.detach()
    tick = time.perf_counter()
    positions = list(range(p.n)) if options.positions is PositionSelection.ALL else [p.n - 1]
    decomposed = decompose(per_position[positions], xs[positions], y, options.top_k)
    truncated: tuple[float, ...] = ()
    if options.positions is PositionSelection.ALL:
        truncated = tuple(truncated_relative_errors(decomposed, per_position, xs, p.constant, y))
    timings["svd_ms"] = _ms(time.perf_counter() - tick)

    tick = time.perf_counter()
    results = []
    for position, spectrum in zip(positions, decomposed, strict=True):
        left_tokens = decoder.output_tokens(spectrum.left, options.tokens_per_vector)
        right_tokens = decoder.input_tokens(spectrum.right, options.tokens_per_vector)
        components = singular_components(spectrum, spectrum.left.shape[-1], left_tokens, right_tokens)
        token_id = p.input_ids[position]
        results.append(
            PositionSpectrum(
                position=position,
                token_id=token_id,
                token_text=decoder.text(token_id),
                components=components,
                singular_values=numpy(spectrum.values),
                captured_share=tuple(float(v) for v in spectrum.captured_share),
                stable_rank=spectrum.stable_rank,
                term_norm=spectrum.term_norm,
            )
        )
    timings["decode_ms"] = _ms(time.perf_counter() - tick)
    return tuple(results), truncated


__all__ = ["explain_output", "numpy", "relative", "singular_components"]
