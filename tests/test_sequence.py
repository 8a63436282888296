"""Explained generation from one shared pass (engine/sequence.py) against a standalone explanation of every prefix.

Every step read off the shared pass must be the explanation ``Explainer.explain(ids[:n], explained_token_id=ids[n])``
computes on its own: float64 within 1e-12 on every family's tiny model (sliding windows of 4, shorter than the 11
tokens, where the family has one), float32 within 1e-5 on SmolLM2. The served model's own numbers (its y, the
logits, and the errors measured against them) come from one forward of the served model over the longest prefix,
so they agree to the served model's precision (float32 here: 1e-5). Breakages these tests were seen to catch (each
made once on purpose): the step's cache not cropped to its prefix (spectra), the attribution rows taken from a
neighbouring step (attributions), the constant read at the wrong position (affine families' constant), the served
model's y read at the step's explained position instead of the one before it (predicted token), the batched position
graph without its attention mask (padding attended: y and spectra) and with every row at the padded position instead
of its own (y).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tiny_models import AFFINE, FAMILIES, sample_ids

from linlens.contract import Explanation, OptionError
from linlens.engine import (
    AttributionTarget,
    ExplainMethod,
    ExplainOptions,
    LayerAnalysisOptions,
    Precision,
)
from linlens.engine.sequence import SequencePass, shares_pass
from linlens.engine.step_spectra import build_batched_position_graph
from linlens.models import LoadedModel

#: The prompt's length; the steps explain the tokens after prefixes of these lengths (of the 11 sample tokens).
PROMPT = 4
LENGTHS = (4, 5, 7, 8, 10)
#: The served model's own numbers (y_model, logits and what compares with them) come from one forward over the
#: longest prefix instead of one per prefix: the same to the served model's rounding (the tiny models and SmolLM2 are
#: served in float32), whatever precision the explanation runs in.
SERVED = 1e-5
#: The tiny random models (initialiser scale 0.25) amplify the served float32 forward's rounding further.
TINY_SERVED = 1e-4
#: Singular vectors, whose rounding is divided by the gap to the next singular value.
VECTORS = {Precision.FLOAT64: 1e-9, Precision.FLOAT32: 1e-3}


def _close(a: object, b: object, tol: float, what: str, floor: float = 1e-300) -> None:
    """||a - b|| / max(||b||, floor) <= tol."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    error = float(np.linalg.norm(x - y)) / max(float(np.linalg.norm(y)), floor)
    assert error <= tol, f"{what}: relative difference {error:.1e} above {tol:.0e}"


def assert_same(got: Explanation, want: Explanation, tol: float, served: float = SERVED) -> None:
    """Every number an explanation reports, within ``tol`` relative (``served`` for the served model's own
    numbers: its y, logits and what compares with them); every token the same."""
    assert got.input_ids == want.input_ids and got.input_tokens == want.input_tokens
    assert got.predicted.token_id == want.predicted.token_id and got.explained.token_id == want.explained.token_id
    _close(got.explained.logit, want.explained.logit, served, "explained logit", floor=1.0)
    _close(got.y, want.y, served, "y")
    _close(got.constant, want.constant, tol, "constant")
    assert len(got.attributions) == len(want.attributions)
    for a, b in zip(got.attributions, want.attributions, strict=True):
        assert a.target == b.target and a.label == b.label
        assert a.per_token.shape == b.per_token.shape
        _close(a.per_token, b.per_token, tol, "attribution")
        _close(a.constant, b.constant if b.constant else a.constant, tol, "attribution constant")
        _close(a.total, b.total, served, "attribution total", floor=1.0)
        # The completeness error is relative to the served model's logit, which can be near zero: compare it as
        # the absolute gap it measures.
        gaps = [e.completeness_error * max(abs(e.total), 1e-30) for e in (a, b)]
        assert abs(gaps[0] - gaps[1]) <= served * max(abs(b.total), 1.0)
    r, s = got.reconstruction, want.reconstruction
    assert r is not None and s is not None
    assert r.linear_token_id == s.linear_token_id and r.predicts_same_token == s.predicts_same_token
    assert abs(r.relative_error_vs_detached - s.relative_error_vs_detached) <= tol
    assert abs(r.relative_error_vs_model - s.relative_error_vs_model) <= served
    assert abs(r.max_abs_logit_error - s.max_abs_logit_error) <= served * max(abs(want.explained.logit), 1.0)
    assert got.method == want.method
    if got.method is ExplainMethod.MATRIX_FREE:
        # The steps' solves run in lockstep: a map's count is its share of each pass's rows, and the passes are
        # as many as the slowest map needs.
        assert 0.75 * want.vjp_count <= got.vjp_count <= 1.5 * want.vjp_count
        assert 0.75 * want.jvp_count <= got.jvp_count <= 1.5 * want.jvp_count
    else:
        assert (got.vjp_count, got.jvp_count) == (want.vjp_count, want.jvp_count)
    assert len(got.spectra) == len(want.spectra)
    for p, q in zip(got.spectra, want.spectra, strict=True):
        assert p.position == q.position and p.token_id == q.token_id
        _close(p.singular_values, q.singular_values, tol, "singular values")
        # A share (u^T t)^2 / ||t||^2 moves by at most 2 ||du||: a matrix-free answer's shares are held to its
        # vectors' tolerance (its certificate target bounds the vectors, not the shares, to 1e-12)
        shares = tol if q.singular_values_complete else max(tol, VECTORS[got.precision])
        _close(p.captured_share, q.captured_share, shares, "captured shares")
        if q.singular_values_complete:
            _close(p.stable_rank, q.stable_rank, tol, "stable rank")
        else:  # an estimate (Hutchinson probes: the lockstep solve draws other probes): within its error bars
            assert abs(p.stable_rank - q.stable_rank) <= 3 * (p.stable_rank_error + q.stable_rank_error) + tol
        for c, e in zip(p.components, q.components, strict=True):
            _close(c.value, e.value, tol, "singular value")
            # Singular vectors move by rounding / (gap to the next value): held to VECTORS, not to the values' tol.
            _close(c.left, e.left, max(tol, VECTORS[got.precision]), "left vector")
            _close(c.right, e.right, max(tol, VECTORS[got.precision]), "right vector")
            assert [t.token_id for t in c.left_tokens] == [t.token_id for t in e.left_tokens]
            assert [t.token_id for t in c.right_tokens] == [t.token_id for t in e.right_tokens]


def _standalone(model: LoadedModel, ids: list[int], n: int, options: ExplainOptions) -> Explanation:
    return model.explainer.explain(ids[:n], dataclasses.replace(options, explained_token_id=ids[n]))


def _check(
    model: LoadedModel,
    ids: list[int],
    lengths: tuple[int, ...],
    options: ExplainOptions,
    tol: float,
    served: float = TINY_SERVED,
) -> None:
    assert shares_pass(model.explainer.context, options, lengths)
    steps = list(model.explainer.explain_steps(ids, lengths, options))
    assert len(steps) == len(lengths)
    for n, got in zip(lengths, steps, strict=True):
        assert_same(got, _standalone(model, ids, n, options), tol, served)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_step_equals_its_standalone_explanation(loaded: dict[str, LoadedModel], family: str) -> None:
    """Default options (top 3 at the last position, AUTO) and a contrast target, float64, every family."""
    options = ExplainOptions(precision=Precision.FLOAT64, targets=(AttributionTarget(token_id=7, contrast_token_id=9),))
    _check(loaded[family], sample_ids(), LENGTHS, options, 1e-12)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "qwen3_moe"])
@pytest.mark.parametrize("method", [ExplainMethod.FULL, ExplainMethod.MATRIX_FREE])
def test_both_spectrum_methods_per_step(loaded: dict[str, LoadedModel], family: str, method: ExplainMethod) -> None:
    options = ExplainOptions(precision=Precision.FLOAT64, method=method, top_k=4)
    _check(loaded[family], sample_ids(seed=3), (1, 2, 6, 10), options, 1e-12)


@pytest.mark.parametrize("family", ["llama-bias", "gemma2", "mixtral"])
def test_attributions_only(loaded: dict[str, LoadedModel], family: str) -> None:
    """top_k 0: attributions and reconstruction only; one step, and a step whose prefix is a single token."""
    options = ExplainOptions(precision=Precision.FLOAT64, top_k=0)
    _check(loaded[family], sample_ids(seed=5), (1,), options, 1e-12)
    _check(loaded[family], sample_ids(seed=5), (1, 3, 9), options, 1e-12)


def test_the_shared_pass_runs_once_over_the_longest_prefix(loaded: dict[str, LoadedModel]) -> None:
    """Its leaf covers the longest prefix only (the last explained token is never an input), its cache holds no
    graph, and its constants are real for an affine family."""
    model = loaded["gpt2"]
    assert "gpt2" in AFFINE
    ids = sample_ids()
    shared = SequencePass(model.explainer.context, ids, LENGTHS, ExplainOptions(precision=Precision.FLOAT64))
    assert shared.x.shape[0] == LENGTHS[-1]
    assert all(not k.requires_grad and not v.requires_grad for k, v in shared.cache)
    assert float(shared.constants.norm()) > 0
    step = shared.step(1)
    assert step.n == LENGTHS[1] and all(k.shape[-2] == LENGTHS[1] - 1 for k, _ in step.prefix)


def test_other_requests_run_one_explanation_per_step(loaded: dict[str, LoadedModel]) -> None:
    """A layer analysis (not shared) still gives every step's standalone answer, its layers included."""
    model = loaded["llama"]
    options = ExplainOptions(precision=Precision.FLOAT64, layers=LayerAnalysisOptions(top_k=1))
    assert not shares_pass(model.explainer.context, options, LENGTHS)
    ids = sample_ids()
    for n, got in zip((4, 6), model.explainer.explain_steps(ids, (4, 6), options), strict=True):
        want = _standalone(model, ids, n, options)
        assert_same(got, want, 1e-12, TINY_SERVED)
        assert len(got.layers) == len(want.layers) > 0


def test_lengths_must_increase(loaded: dict[str, LoadedModel]) -> None:
    context = loaded["llama"].explainer.context
    for lengths in ((5, 4), (4, 4), (0,), (11,)):
        with pytest.raises(ValueError, match="must increase"):
            SequencePass(context, sample_ids(), lengths, ExplainOptions(precision=Precision.FLOAT64))


def test_smollm2_steps_in_float32(smollm2: LoadedModel) -> None:
    """A real model in float32, default options: every step within 1e-5 of its standalone explanation, with the
    same decoded tokens."""
    ids = smollm2.tokenizer("The bridge out of Marin is the longest bridge in the")["input_ids"]
    prompt = 7
    _check(smollm2, ids, (prompt, prompt + 1, prompt + 2, len(ids) - 1), ExplainOptions(), 1e-5, SERVED)


def test_memory_estimate_counts_every_steps_attributions(loaded: dict[str, LoadedModel]) -> None:
    """A shared pass keeps the longest prefix's graphs, as its own explanation would, but batches one attribution
    cotangent per step and target (up to the VJP chunk), and the steps' spectra run on one batched position graph
    with every step's prefix of keys and values: admission's estimate counts both."""
    explainer = loaded["llama"].explainer
    targets = (AttributionTarget(token_id=7),)
    options = ExplainOptions(precision=Precision.FLOAT64, top_k=0, targets=targets)
    one = explainer.memory_estimate(10, options)
    many = explainer.memory_estimate(10, options, steps=6)
    chunk = explainer.context.vjp_chunk(10, torch.float64)
    assert one.vjps == 2 and many.vjps == min(chunk, 12) and many.graph == one.graph
    assert many.total > one.total
    spectra = ExplainOptions(precision=Precision.FLOAT64, top_k=3, targets=targets)
    alone, steps = explainer.memory_estimate(10, spectra), explainer.memory_estimate(10, spectra, steps=6)
    context = explainer.context
    padded = 6 * context.num_layers * 2 * 10 * context.hidden_size * 8
    assert steps.position == alone.position + padded and steps.vjps >= alone.vjps


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_position_graph_is_every_steps_own(loaded: dict[str, LoadedModel], family: str) -> None:
    """Row k of the batched position graph is step k's own position graph: the same y and J_k within 1e-12, and
    no row reaches another row's input (padding masked, nothing mixes rows)."""
    model = loaded[family]
    lengths = (1, 4, 5, 8, 10)
    shared = SequencePass(model.explainer.context, sample_ids(), lengths, ExplainOptions(precision=Precision.FLOAT64))
    prefixes = [n - 1 for n in lengths]
    graph = build_batched_position_graph(shared.twin, shared.x.detach()[prefixes], shared.cache, prefixes)
    count, d = graph.y.shape
    eye = torch.eye(d, dtype=graph.y.dtype)
    for row in range(count):
        own = shared.step(row).position_graph()
        (want,) = torch.autograd.grad(own.y, own.x, grad_outputs=eye, is_grads_batched=True)
        cotangents = torch.zeros((d, count, d), dtype=graph.y.dtype)
        cotangents[:, row] = eye
        (got,) = torch.autograd.grad(
            graph.y, graph.x, grad_outputs=cotangents, is_grads_batched=True, retain_graph=True
        )
        _close(graph.y[row].detach(), own.y.detach(), 1e-12, f"y of step {row}")
        _close(got[:, row], want, 1e-12, f"J of step {row}")
        others = torch.cat([got[:, :row], got[:, row + 1 :]], dim=1)
        assert float(others.abs().max()) == 0.0


def test_steps_out_of_order_are_explained_one_by_one(loaded: dict[str, LoadedModel]) -> None:
    """Prefix lengths that do not increase cannot share a pass: each step is explained on its own, in the order
    given; a length without its explained token is refused."""
    model = loaded["llama"]
    options = ExplainOptions(precision=Precision.FLOAT64, top_k=0)
    ids = sample_ids()
    got = list(model.explainer.explain_steps(ids, (6, 4), options))
    for n, explanation in zip((6, 4), got, strict=True):
        assert_same(explanation, _standalone(model, ids, n, options), 1e-12, TINY_SERVED)
    with pytest.raises(OptionError, match="lengths"):
        list(model.explainer.explain_steps(ids, (4, len(ids)), options))
