"""Human-readable rendering of explanations and generations for the terminal (plain text, no colour codes)."""

from __future__ import annotations

from collections.abc import Sequence

from linlens.client import Explanation, Generation, ModelInfo


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
            f"J at position {spectrum.position} {spectrum.token_text!r}: stable rank {spectrum.stable_rank:.2f}, "
            f"share of its term kept by rank 1..k: {shares}"
        )
        for component in spectrum.components:
            lines.append(f"  #{component.rank} s={component.value:.3f}")
            lines.append(f"     output side (LM head): {_tokens(component.left_tokens, tokens_per_vector)}")
            lines.append(f"     input side (nearest embeddings): {_tokens(component.right_tokens, tokens_per_vector)}")
    if exp.truncated_relative_error:
        errors = " ".join(f"{e:.2e}" for e in exp.truncated_relative_error)
        lines.append(f"\nrelative error of y with every J_i truncated to rank 1..k: {errors}")
    t = exp.timings
    lines.append(
        f"\ntimings (ms): forward {t.forward_ms:.0f}, attribution {t.attribution_ms:.0f}, jacobian {t.jacobian_ms:.0f},"
        f" svd {t.svd_ms:.0f}, decode {t.decode_ms:.0f}; {exp.vjp_count} vector-Jacobian products"
    )
    return "\n".join(lines)


def generation_text(result: Generation) -> str:
    lines = [result.text, "", f"finish: {result.finish_reason.value}, tokens: {result.usage.completion_tokens}"]
    for exp in result.explanations:
        lines.append("")
        lines.append(f"--- explanation of generated step {exp.step} ---")
        lines.append(explanation_text(exp))
    return "\n".join(lines)


def models_text(models: Sequence[ModelInfo]) -> str:
    lines = [f"{'name':<16} {'family':<8} {'architecture':<20} {'d':>5} {'layers':>6} {'vocab':>7} dtype   device"]
    for m in models:
        lines.append(
            f"{m.name:<16} {m.family:<8} {m.architecture:<20} {m.hidden_size:>5} {m.num_layers:>6} {m.vocab_size:>7} "
            f"{m.dtype:<7} {m.device}{'  (default)' if m.is_default else ''}"
        )
    return "\n".join(lines)
