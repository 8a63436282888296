"""What a report shows, derived once from a result: the HTML document and the PNG figures draw the same numbers.

A report is built from an ``ExplainResult`` (one explanation, with its model and prompt), a bare ``Explanation``, or
a ``Generation`` (its text, then one section per explained step). Every number drawn comes from the result as it is,
except two derived series of the emergence chart, defined here once:

- the **cumulative logit share** after layer l: (direct path + the attention and MLP logit contributions of layers
  0..l) / logit. It starts at the direct path's share and ends at 1 (up to bias constants, which are inside the
  per-layer totals): how much of the explained logit the residual stream already holds after each layer;
- the **rank** of the explained token in a layer's up-to-layer map: its 1-based place among the decoded tokens of the
  map's first singular vector (``up_to_layer.components[0].left_tokens``, compared by token id), or None when it is
  not among them (the list holds ``LayerAnalysisOptions.tokens_per_vector`` tokens).

The layer panels exist only when the explanation carries a layer analysis; the spectrum and singular-vector panels
only when the full Jacobian was computed (top_k > 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from linlens.contract.results import (
    Attribution,
    ExplainResult,
    Explanation,
    GeneratedToken,
    Generation,
    LayerAttributions,
    LayerResult,
    LinearMapSpectrum,
    PositionSpectrum,
    PredictedToken,
    SingularComponent,
)

#: What a report can be made of.
Reportable = ExplainResult | Explanation | Generation


@dataclass(frozen=True)
class AttributionRow:
    """One row of shaded tokens: an attribution target's exact split over the input tokens.

    The attribution itself carries the label, the total, the constant and the completeness error (the row does not
    copy them); the row adds what the report derives: the kind, the tokens, the values as floats and the scale."""

    attribution: Attribution
    #: "explained" (the explained token's logit), "target" (an extra token's logit) or "contrast" (A - B).
    kind: str
    tokens: tuple[str, ...]
    #: ``attribution.per_token`` as floats, one per token.
    values: tuple[float, ...]
    #: The colour scale's end: the largest |value| of the row (each row has its own scale).
    scale: float


@dataclass(frozen=True)
class Emergence:
    """The emergence chart's series (see the module docstring)."""

    explained: PredictedToken
    #: Every layer, 0..L-1, and after each the cumulative logit share.
    layers: tuple[int, ...]
    cumulative_share: tuple[float, ...]
    #: The direct path's share (the chart's start, "before layer 0").
    direct_share: float
    #: The selected layers that have an up-to-layer map with components, and the explained token's rank in each.
    rank_layers: tuple[int, ...]
    ranks: tuple[int | None, ...]
    #: How many decoded tokens each of those maps lists (a rank of None means "below this").
    depths: tuple[int, ...]


@dataclass(frozen=True)
class ExplanationView:
    """One explanation's section of a report."""

    explanation: Explanation
    heading: str
    facts: tuple[tuple[str, str], ...]
    attributions: tuple[AttributionRow, ...]
    layer_attributions: LayerAttributions | None
    layers: tuple[LayerResult, ...]
    emergence: Emergence | None


@dataclass(frozen=True)
class Report:
    """A whole report: a title, facts about the request, and one section per explanation."""

    title: str
    facts: tuple[tuple[str, str], ...]
    sections: tuple[ExplanationView, ...]
    #: For a generation: the generated text (shown after the prompt) and its tokens; None and () otherwise.
    continuation: str | None = None
    generated: tuple[GeneratedToken, ...] = ()


def token_label(text: str) -> str:
    """A token as the terminal report writes it: Python's repr, so that spaces and control characters show."""
    return repr(text)


def _number(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def _predicted(token: PredictedToken) -> str:
    return (
        f"{token_label(token.text)} (id {token.token_id}), logit {_number(token.logit)}, "
        f"p = {_number(token.probability)}"
    )


def attribution_kind(attribution: Attribution, index: int) -> str:
    """explained, target or contrast (attributions[0] is always the explained token)."""
    if attribution.target.contrast_token_id is not None:
        return "contrast"
    return "explained" if index == 0 else "target"


def attribution_rows(exp: Explanation) -> tuple[AttributionRow, ...]:
    """One row per attribution: the explained token's first, then each extra target and contrast."""
    rows = []
    for index, attribution in enumerate(exp.attributions):
        values = tuple(float(v) for v in np.asarray(attribution.per_token, dtype=np.float64))
        finite = [abs(v) for v in values if math.isfinite(v)]
        rows.append(
            AttributionRow(
                attribution=attribution,
                kind=attribution_kind(attribution, index),
                tokens=exp.input_tokens,
                values=values,
                scale=max(finite, default=0.0),
            )
        )
    return tuple(rows)


def explained_rank(spectrum: LinearMapSpectrum | None, token_id: int) -> int | None:
    """The explained token's 1-based place among the first singular vector's decoded tokens, None when absent."""
    if spectrum is None or not spectrum.components:
        return None
    for place, scored in enumerate(spectrum.components[0].left_tokens, start=1):
        if scored.token_id == token_id:
            return place
    return None


def emergence(attributions: LayerAttributions | None, layers: Sequence[LayerResult]) -> Emergence | None:
    """The emergence chart's series; None without a layer analysis."""
    if attributions is None:
        return None
    logit = float(attributions.logit)
    per_layer = np.asarray(attributions.attention_logits, dtype=np.float64) + np.asarray(
        attributions.mlp_logits, dtype=np.float64
    )
    direct = float(np.asarray(attributions.direct, dtype=np.float64).sum())
    scale = logit if logit != 0 else float("nan")
    cumulative = (direct + np.cumsum(per_layer)) / scale
    mapped = sorted(
        (r for r in layers if r.up_to_layer is not None and r.up_to_layer.components), key=lambda r: r.layer
    )
    token_id = attributions.explained.token_id
    return Emergence(
        explained=attributions.explained,
        layers=tuple(range(per_layer.shape[0])),
        cumulative_share=tuple(float(v) for v in cumulative),
        direct_share=direct / scale,
        rank_layers=tuple(r.layer for r in mapped),
        ranks=tuple(explained_rank(r.up_to_layer, token_id) for r in mapped),
        depths=tuple(len(r.up_to_layer.components[0].left_tokens) for r in mapped if r.up_to_layer is not None),
    )


def stable_rank_text(spectrum: PositionSpectrum | LinearMapSpectrum) -> str:
    """The stable rank as a report shows it: exact (full method), or estimated with one standard error (matrix-free:
    ||J||_F^2 is then a Hutchinson estimate)."""
    if spectrum.singular_values_complete or not spectrum.stable_rank_error:
        return f"{spectrum.stable_rank:.2f}"
    return f"≈ {spectrum.stable_rank:.2f} ± {spectrum.stable_rank_error:.2f} (estimated)"


def spectrum_extent(spectrum: PositionSpectrum | LinearMapSpectrum) -> str:
    """Which singular values a spectrum chart holds: all of them, or the top k a matrix-free solve found."""
    count = len(spectrum.singular_values)
    if spectrum.singular_values_complete:
        return f"all {count} singular values"
    return f"the top {count} singular values (matrix-free: the rest were not computed)"


def certificate_text(component: SingularComponent) -> str:
    """A triplet's certificate: ||A v - s u|| / s and ||A^T u - s v|| / s from fresh products (0: a full SVD)."""
    if not component.residual_left and not component.residual_right:
        return "exact SVD"
    return f"residuals {component.residual_left:.1e} / {component.residual_right:.1e}"


def explanation_facts(exp: Explanation) -> tuple[tuple[str, str], ...]:
    """The header of one explanation: prediction, exactness, method and cost."""
    facts: list[tuple[str, str]] = [("predicted", _predicted(exp.predicted))]
    if exp.explained.token_id != exp.predicted.token_id:
        facts.append(("explained", _predicted(exp.explained)))
    r = exp.reconstruction
    if r is not None:
        facts.append(
            (
                "reconstruction",
                f"y = Σ J_i x_i{' + c' if exp.has_bias else ''}: relative error {r.relative_error_vs_model:.2e} vs the "
                f"model, {r.relative_error_vs_detached:.2e} vs the detached pass; max logit error "
                f"{r.max_abs_logit_error:.2e}; same top token: {'yes' if r.predicts_same_token else 'NO'}",
            )
        )
    else:
        facts.append(("reconstruction", "not reported (a server older than 0.2.0 without a full Jacobian)"))
    if exp.ordinary is not None:
        facts.append(
            (
                "ordinary Jacobian",
                f"relative error {exp.ordinary.relative_error_vs_model:.2e} (not detached, for contrast); same top "
                f"token: {'yes' if exp.ordinary.predicts_same_token else 'NO'}",
            )
        )
    if exp.truncated_relative_error:
        errors = ", ".join(f"{e:.2e}" for e in exp.truncated_relative_error)
        facts.append(("every J_i truncated to rank 1..k", f"relative error of y {errors}"))
    facts.append(
        (
            "method",
            f"detached Jacobian (arXiv 2505.24293), {exp.precision.value}, gate mode {exp.gate_mode.value}"
            + (", with bias constants" if exp.has_bias else "")
            + (f"; spectra {exp.method.value.replace('_', '-')}" if exp.method is not None else ""),
        )
    )
    phases = ", ".join(f"{name} {ms:.0f}" for name, ms in exp.timings.phases_ms().items())
    facts.append(
        (
            "cost",
            f"{exp.vjp_count} vector-Jacobian and {exp.jvp_count} Jacobian-vector products; "
            f"{exp.timings.total_ms:.0f} ms" + (f" ({phases})" if phases else ""),
        )
    )
    return tuple(facts)


def explanation_view(exp: Explanation, heading: str) -> ExplanationView:
    return ExplanationView(
        explanation=exp,
        heading=heading,
        facts=explanation_facts(exp),
        attributions=attribution_rows(exp),
        layer_attributions=exp.layer_attributions,
        layers=tuple(exp.layers),
        emergence=emergence(exp.layer_attributions, exp.layers),
    )


def build(result: Reportable) -> Report:
    """The report of ``result`` (an ExplainResult, an Explanation or a Generation)."""
    if isinstance(result, ExplainResult):
        exp = result.explanation
        return Report(
            title=f"linlens: {result.model}, {token_label(exp.explained.text)} explained",
            facts=(("model", result.model), ("prompt", result.prompt_text)),
            sections=(explanation_view(exp, "Explanation"),),
        )
    if isinstance(result, Explanation):
        return Report(
            title=f"linlens: {token_label(result.explained.text)} explained",
            facts=(("prompt (its tokens)", "".join(result.input_tokens)),),
            sections=(explanation_view(result, "Explanation"),),
        )
    if isinstance(result, Generation):
        usage = result.usage
        facts: list[tuple[str, str]] = [
            ("model", result.model),
            ("prompt", result.prompt_text),
            (
                "generation",
                f"{usage.completion_tokens} tokens, finish: {result.finish_reason.value}"
                + (f", seed {result.seed}" if result.seed is not None else "")
                + f"; {usage.explained_steps} explained step(s)"
                + (f"; {result.timings.total_ms:.0f} ms" if result.timings.total_ms > 0 else ""),
            ),
        ]
        sections = tuple(
            explanation_view(exp, f"Step {exp.step}: {token_label(exp.explained.text)}") for exp in result.explanations
        )
        return Report(
            title=f"linlens: {result.model}, generation",
            facts=tuple(facts),
            sections=sections,
            continuation=result.text,
            generated=result.tokens,
        )
    raise TypeError(
        f"a report is made of an ExplainResult, an Explanation or a Generation, not {type(result).__name__}"
    )
