"""Human-readable rendering of explanations and generations for the terminal (plain text, no colour codes)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from linlens.contract import Explanation, Generation, GenerationDone, LayerAttributions, LayerResult
from linlens.contract.results import LinearMapSpectrum, ModelInfo, PositionSpectrum, SingularComponent


def _bar(value: float, scale: float, width: int = 24) -> str:
    if scale <= 0:
        return ""
    cells = round(abs(value) / scale * width)
    return ("█" if value >= 0 else "░") * cells


def _tokens(scores: Sequence[object], limit: int) -> str:
    return ", ".join(repr(getattr(t, "text", "")) for t in list(scores)[:limit])


def explanation_text(exp: Explanation, *, tokens_per_vector: int = 8) -> str:
    """A compact report: prediction, exactness, per-token attribution bars, and decoded singular vectors."""
    lines: list[str] = []
    lines.append("input: " + " | ".join(repr(t) for t in exp.input_tokens))
    p = exp.predicted
    lines.append(f"predicted: {p.text!r} (id {p.token_id}, logit {p.logit:.4f}, p={p.probability:.4f})")
    if exp.explained.token_id != p.token_id:
        e = exp.explained
        lines.append(f"explained: {e.text!r} (id {e.token_id}, logit {e.logit:.4f}, p={e.probability:.4f})")
    r = exp.reconstruction
    if r is not None:
        lines.append(
            f"reconstruction y = sum_i J_i x_i{' + c' if exp.has_bias else ''}: "
            f"relative error {r.relative_error_vs_model:.2e}"
            f" vs the model, {r.relative_error_vs_detached:.2e} vs the detached pass; max logit error "
            f"{r.max_abs_logit_error:.2e}; same token: {'yes' if r.predicts_same_token else 'NO'}"
        )
    if exp.ordinary is not None:
        lines.append(
            f"ordinary (not detached) Jacobian for contrast: relative error {exp.ordinary.relative_error_vs_model:.2e}"
        )
    for attribution in exp.attributions:
        values = list(attribution.per_token)
        scale = max((abs(v) for v in values), default=0.0)
        lines.append("")
        lines.append(
            f"attribution to {attribution.label!r}: sum {sum(values):.4f}"
            + (f" + constant {attribution.constant:.4f}" if exp.has_bias else "")
            + f" = {attribution.total:.4f} (completeness error {attribution.completeness_error:.1e})"
        )
        for token, value in zip(exp.input_tokens, values, strict=False):
            lines.append(f"  {token!r:>16} {value:+9.4f} {_bar(value, scale)}")
    for spectrum in exp.spectra:
        lines.append("")
        shares = " ".join(f"{s:.3f}" for s in spectrum.captured_share)
        lines.append(
            f"J at position {spectrum.position} {spectrum.token_text!r}: stable rank {_stable_rank(spectrum)}, "
            f"share of its term kept by rank 1..k: {shares}"
        )
        lines.extend(_components(spectrum.components, tokens_per_vector, "input side (nearest embeddings)"))
    if exp.prompt_spectrum is not None:
        whole = exp.prompt_spectrum
        lines.append("")
        lines.append(
            f"whole prompt [J_1 ... J_n]: stable rank {_stable_rank(whole)}, share of J x kept by rank 1..k: "
            + " ".join(f"{s:.3f}" for s in whole.captured_share)
        )
        lines.extend(_components(whole.components, tokens_per_vector, "input side (its main position's nearest)"))
    if exp.truncated_relative_error:
        errors = " ".join(f"{e:.2e}" for e in exp.truncated_relative_error)
        lines.append(f"\nrelative error of y with every J_i truncated to rank 1..k: {errors}")
    t = exp.timings
    method = f"{exp.method.value.replace('_', '-')}: " if exp.method is not None else ""
    lines.append(
        f"\ntimings (ms): forward {t.forward_ms:.0f}, attribution {t.attribution_ms:.0f}, reconstruction "
        f"{t.reconstruction_ms:.0f}, jacobian {t.jacobian_ms:.0f}, svd {t.svd_ms:.0f}, decode {t.decode_ms:.0f}; "
        f"{method}{exp.vjp_count} vector-Jacobian and {exp.jvp_count} Jacobian-vector products"
    )
    return "\n".join(lines)


def _stable_rank(spectrum: PositionSpectrum | LinearMapSpectrum) -> str:
    if spectrum.stable_rank_error:
        return f"{spectrum.stable_rank:.2f} ± {spectrum.stable_rank_error:.2f} (estimated)"
    return f"{spectrum.stable_rank:.2f}"


def _components(components: Sequence[SingularComponent], limit: int, right: str) -> list[str]:
    lines = []
    for component in components:
        certificate = max(component.residual_left, component.residual_right)
        lines.append(f"  #{component.rank} s={component.value:.3f} (residual {certificate:.1e})")
        lines.append(f"     output side (LM head): {_tokens(component.left_tokens, limit)}")
        lines.append(f"     {right}: {_tokens(component.right_tokens, limit)}")
    return lines


#: Shades of |value| / max |value| in the heat map, faint to strong.
_SHADES = "·░▒▓█"


def _shade(value: float, scale: float) -> str:
    """Two characters for one heat-map cell: the shade twice when positive, "-" and the shade when negative.

    The shade follows sqrt(|value| / scale), so that a few large cells (the first token often soaks up attention)
    do not wash every other cell out to the faintest shade.
    """
    ratio = 0.0 if scale <= 0 else min(1.0, abs(value) / scale)
    level = min(len(_SHADES) - 1, int(ratio**0.5 * (len(_SHADES) - 1) + 0.5))
    glyph = _SHADES[level]
    return glyph * 2 if value >= 0 else "-" + glyph


def heatmap_text(attributions: LayerAttributions) -> str:
    """The layers x tokens matrix as a text heat map: one row per layer, one column per input token."""
    matrix = np.asarray(attributions.per_layer, dtype=np.float64)
    if matrix.ndim != 2 or matrix.size == 0:
        return "(no layers x tokens matrix)"
    scale = float(np.abs(matrix).max())
    count, n = matrix.shape
    lines = [
        f"layers x tokens: contribution of each input token, through each layer, to the logit of "
        f"{attributions.explained.text!r} (shade: sqrt(|value| / {scale:.3f}); '-' marks negative)",
        "      " + " ".join(f"{i:>2}" for i in range(n)) + "    layer total",
    ]
    for layer in range(count):
        row = matrix[layer]
        cells = " ".join(_shade(float(v), scale) for v in row)
        lines.append(f"  {layer:>3} {cells}  {float(row.sum()):+9.4f}")
    direct = np.asarray(attributions.direct, dtype=np.float64)
    lines.append(f"  dir {' '.join(_shade(float(v), scale) for v in direct)}  {float(direct.sum()):+9.4f}")
    lines.append("  tokens: " + "  ".join(f"{i} {t!r}" for i, t in enumerate(attributions.input_tokens)))
    return "\n".join(lines)


def _top(spectrum: LinearMapSpectrum | None, limit: int) -> tuple[str, str]:
    if spectrum is None:
        return "", "-"
    rank = f"{spectrum.stable_rank:6.2f}"
    if not spectrum.components:
        return rank, "(top_k 0)"
    return rank, _tokens(spectrum.components[0].left_tokens, limit)


def layers_text(
    attributions: LayerAttributions | None, layers: Sequence[LayerResult], *, tokens: int = 5, heatmap: bool = True
) -> str:
    """A compact table per analysed layer (component, share of the explained logit, stable rank, top decoded
    tokens of the first singular vector), then the layers x tokens heat map."""
    lines: list[str] = []
    logit = attributions.logit if attributions is not None else 0.0
    cumulative: list[float] = []
    if attributions is not None:
        e = attributions.explained
        running = float(np.asarray(attributions.direct, dtype=np.float64).sum())
        lines.append(
            f"layer by layer: logit of {e.text!r} (id {e.token_id}) = {logit:.4f}; direct path {running:+.4f}; "
            f"blocks + direct path = logit (completeness error {attributions.completeness_error:.1e}, "
            f"decomposition error {attributions.decomposition_error:.1e})"
        )
        for a, m in zip(attributions.attention_logits, attributions.mlp_logits, strict=True):
            running += float(a) + float(m)
            cumulative.append(running)

    def share(value: float) -> str:
        return f"{100.0 * value / logit:+7.1f}%" if logit else "      - "

    if layers:
        lines.append("share: of the explained logit (up-to-layer: direct path and every block up to this layer)")
        lines.append(f"{'layer':>5}  {'component':<12} {'share':>8} {'srank':>6}  top tokens (1st singular vector)")
    for result in layers:
        rank, top = _top(result.up_to_layer, tokens)
        up_to_share = share(cumulative[result.layer]) if result.layer < len(cumulative) else "      - "
        rows = [("up-to-layer", up_to_share, rank, top) if result.up_to_layer is not None else None]
        if result.layer_alone is not None:
            rank, top = _top(result.layer_alone, tokens)
            rows.append(("layer alone", share(result.attention.logit + result.mlp.logit), rank, top))
        for block in (result.attention, result.mlp):
            rank, top = _top(block.spectrum, tokens)
            rows.append((block.component, share(block.logit), rank, top))
        first = True
        for row in rows:
            if row is None:
                continue
            name, value, rank, top = row
            label = f"{result.layer:>5}" if first else " " * 5
            lines.append(f"{label}  {name:<12} {value:>8} {rank:>6}  {top}".rstrip())
            first = False
    if heatmap and attributions is not None:
        lines.append("")
        lines.append(heatmap_text(attributions))
    return "\n".join(lines)


def explanation_report(exp: Explanation) -> str:
    """The explanation and, when it has one, its layer-by-layer analysis."""
    text = explanation_text(exp)
    if exp.layer_attributions is not None or exp.layers:
        text += "\n\n" + layers_text(exp.layer_attributions, exp.layers)
    return text


def finish_text(result: Generation | GenerationDone) -> str:
    seed = f", seed {result.seed}" if result.seed is not None else ""
    return f"finish: {result.finish_reason.value}, tokens: {result.usage.completion_tokens}{seed}"


def explanations_text(explanations: Sequence[Explanation]) -> str:
    return "\n".join(
        f"\n--- explanation of generated step {exp.step} ---\n{explanation_report(exp)}" for exp in explanations
    )


def generation_text(result: Generation) -> str:
    return "\n".join([result.text, "", finish_text(result), explanations_text(result.explanations)]).rstrip()


def models_text(models: Sequence[ModelInfo]) -> str:
    lines = [
        f"{'name':<16} {'state':<8} {'family':<8} {'architecture':<20} {'d':>5} {'layers':>6} {'vocab':>7} "
        "dtype   device"
    ]
    for m in models:
        lines.append(
            f"{m.name:<16} {m.state.value:<8} {m.family:<8} {m.architecture:<20} {m.hidden_size:>5} {m.num_layers:>6} "
            f"{m.vocab_size:>7} {m.dtype:<7} {m.device}{'  (default)' if m.is_default else ''}"
        )
        if m.state_detail:
            lines.append(f"{'':<16} {m.state_detail}")
    return "\n".join(lines)
