"""Independent checks of the numbers an explanation returns: each one is recomputed another way.

An explanation holds y, the Jacobians J_i (on request), the constant c, per-token attributions and the layers x
tokens matrix. None of them may be checked by algebra (a residual defined to make a sum come out right). Each check
here recomputes its number from something the engine did not use to produce it:

- the reconstruction: sum_i J_i x_i + c against y from the *unmodified* model's own forward pass, with x read from
  the model's embedding table by the test;
- the constant c: the frozen system at input zero, from a fresh explanation pass (a :class:`Reference`), never y - Jx;
- attributions: against w . J_i x_i from the returned Jacobians, and against a central difference of the frozen
  system along x_i, a forward-only computation (exact for an affine map, so the tolerance is rounding);
- the layers x tokens matrix: each block's row from central differences of that block's residual term, captured in
  forward passes of the frozen system, pushed through the final norm module itself (replayed with its frozen
  coefficient: the scale, and LayerNorm's mean subtraction); each block's constant from the frozen system at zero;
- logits as the model's own forward pass makes them: the LM head times the scalar it multiplies logits by, measured
  from the model's logits (:func:`logit_head`).

Every check raises AssertionError with what differed; ``tests/test_checks_have_teeth.py`` breaks the engine on purpose
and asserts that each check notices.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from linlens.contract import ExplainOptions, Explanation, GateMode, Precision
from linlens.engine.capture import Capture
from linlens.engine.context import DTYPES, ModelContext
from linlens.engine.forward import ExplanationPass
from linlens.engine.freeze import replaying
from linlens.models import LoadedModel


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / np.linalg.norm(b))


@dataclass
class Reference:
    """The frozen system of one prediction (same input, precision and gate mode as the explanation checked), rebuilt
    from a fresh context of the model: what the checks compare with."""

    model: LoadedModel
    ids: list[int]
    precision: Precision = Precision.FLOAT64
    gate_mode: GateMode = GateMode.FREEZE_GATE

    @classmethod
    def of(cls, model: LoadedModel, exp: Explanation) -> Reference:
        return cls(model, list(exp.input_ids), exp.precision, exp.gate_mode)

    def __post_init__(self) -> None:
        self.context = ModelContext(self.model.model, self.model.tokenizer)
        options = ExplainOptions(top_k=0, precision=self.precision, gate_mode=self.gate_mode)
        self.pass_ = ExplanationPass(self.context, self.ids, options)
        self.dtype = DTYPES[self.precision]
        self.x = self.pass_.x.detach()

    def frozen(self, inputs: torch.Tensor, capture: Capture | None = None) -> torch.Tensor:
        return self.pass_.frozen_output(inputs, capture)

    def direction(self, position: int, scale: float = 1.0) -> torch.Tensor:
        """x_i at position i and zeros elsewhere: the direction whose derivative is J_i x_i."""
        d = torch.zeros_like(self.x)
        d[position] = self.x[position] * scale
        return d

    def term(self, position: int) -> torch.Tensor:
        """J_i x_i by a central difference of the frozen (affine) system: F(x + d) - F(x - d) = 2 J d."""
        d = self.direction(position)
        return (self.frozen(self.x + d) - self.frozen(self.x - d)) / 2


def _logit_multiplier(model: Any, ids: Sequence[int]) -> float:
    """logits / (W y) of ``model``'s own forward pass (soft-capping undone), by least squares over the vocabulary."""
    head = model.get_output_embeddings().weight.detach()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(ids)]), use_cache=False).logits[0, -1].double()
        y = model.base_model(input_ids=torch.tensor([list(ids)]), use_cache=False).last_hidden_state[0, -1]
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.atanh(logits / cap) * cap
    plain = (head @ y).double()
    return float(logits @ plain / (plain @ plain))


def logit_head(model: LoadedModel, ids: Sequence[int]) -> torch.Tensor:
    """The map from y to logits as the model's own forward pass applies it, float64: the LM head times the scalar
    the model multiplies its logits by (Granite's 1 / logits_scaling, Cohere's logit_scale), measured from the
    model's logits (soft-capping undone) rather than read from the engine's family table. A float32 measurement is
    good to ~1e-7: one that is 1 to that precision is 1; any other is measured again on a float64 copy."""
    head = model.model.get_output_embeddings().weight.detach().double()
    multiplier = _logit_multiplier(model.model, ids)
    if abs(multiplier - 1.0) <= 1e-5:
        return head
    return head * _logit_multiplier(copy.deepcopy(model.model).double(), ids)
    return head * multiplier


def model_output(model: LoadedModel, ids: Sequence[int]) -> np.ndarray:
    """y from the served model's own, unmodified forward pass (float64)."""
    with torch.no_grad():
        hidden = model.model.base_model(input_ids=torch.tensor([list(ids)]), use_cache=False).last_hidden_state
    return hidden[0, -1].double().numpy()


def embeddings(model: LoadedModel, ids: Sequence[int]) -> np.ndarray:
    """The input embeddings x (n, d) as the model computes them (embedding scaling included), float64."""
    with torch.no_grad():
        return model.model.get_input_embeddings()(torch.tensor(list(ids))).double().numpy()


def _rebuilt(model: LoadedModel, exp: Explanation) -> np.ndarray:
    assert exp.jacobians is not None, "ask for include_jacobians to check the reconstruction independently"
    x = embeddings(model, exp.input_ids)
    return np.einsum("nod,nd->o", exp.jacobians.astype(np.float64), x) + exp.constant.astype(np.float64)


def check_reconstruction(model: LoadedModel, exp: Explanation, limit: float) -> float:
    """sum_i J_i x_i + c against the unmodified model's y; needs ``include_jacobians``. Returns the error."""
    error = relative(_rebuilt(model, exp), model_output(model, exp.input_ids))
    assert error <= limit, f"sum_i J_i x_i + c misses the model's y by {error:.2e} (limit {limit:.0e})"
    return error


def check_exactness(reference: Reference, exp: Explanation, limit: float) -> float:
    """sum_i J_i x_i + c against the frozen system's own output in the explanation's precision (a fresh pass):
    the linear system is exact to rounding. Needs ``include_jacobians``. Returns the error."""
    error = relative(_rebuilt(reference.model, exp), reference.frozen(reference.x).double().numpy())
    assert error <= limit, f"sum_i J_i x_i + c misses the frozen system's y by {error:.2e} (limit {limit:.0e})"
    return error


def check_constant(reference: Reference, exp: Explanation, limit: float) -> float:
    """c against the frozen system at input zero (a fresh pass); 0 for a bias-free model. Returns the error."""
    expected = reference.frozen(torch.zeros_like(reference.x)).double().numpy()
    scale = max(float(np.linalg.norm(expected)), float(np.linalg.norm(exp.y)), 1e-300)
    error = float(np.linalg.norm(exp.constant.astype(np.float64) - expected)) / scale
    assert error <= limit, f"c differs from the frozen system at zero by {error:.2e} of ||y|| (limit {limit:.0e})"
    return error


def check_attributions(reference: Reference, exp: Explanation, limit: float) -> float:
    """Every attribution's per-token values against w . J_i x_i by central differences (and against the returned
    Jacobians when there are some). Returns the largest error relative to the largest |a_i|."""
    head = logit_head(reference.model, reference.ids)
    terms = torch.stack([reference.term(i).double() for i in range(len(exp.input_ids))])  # (n, d)
    worst = 0.0
    for attribution in exp.attributions:
        target = attribution.target
        w = head[target.token_id] - (head[target.contrast_token_id] if target.contrast_token_id is not None else 0)
        expected = (terms @ w).numpy()
        scale = max(float(np.abs(expected).max()), 1e-300)
        error = float(np.abs(attribution.per_token - expected).max()) / scale
        assert error <= limit, (
            f"attribution {attribution.label!r}: per-token values differ from w . J_i x_i (central differences) by "
            f"{error:.2e} of the largest (limit {limit:.0e}): {attribution.per_token} vs {expected}"
        )
        if exp.jacobians is not None:
            x = embeddings(reference.model, exp.input_ids)
            from_jacobians = np.einsum("o,nod,nd->n", w.numpy(), exp.jacobians.astype(np.float64), x)
            error_j = float(np.abs(attribution.per_token - from_jacobians).max()) / scale
            assert error_j <= limit, f"attributions differ from w . J_i x_i of the returned J by {error_j:.2e}"
            error = max(error, error_j)
        worst = max(worst, error)
    return worst


def check_layer_matrix(reference: Reference, exp: Explanation, limit: float) -> float:
    """Each row of the layers x tokens matrix (per block) and each block's constant, recomputed from forward passes
    of the frozen system. Returns the largest error relative to the largest entry."""
    matrix = exp.layer_attributions
    assert matrix is not None, "ask for a layer analysis to check the matrix"
    w = logit_head(reference.model, reference.ids)[matrix.explained.token_id]
    base = Capture()
    reference.frozen(reference.x, base)
    count = len(base.layer_outputs)
    n = len(exp.input_ids)

    def logit_share(term: torch.Tensor) -> float:
        """w . L(term), L the linear part of the frozen final norm at the last position: the norm module of the
        reference's twin replayed with the coefficient its pass froze, at the term and at zero."""
        norm = getattr(reference.pass_.twin.base_model, reference.context.family.final_norm)
        placed = torch.zeros((1, n, term.shape[-1]), dtype=reference.dtype)
        placed[0, -1] = term.to(reference.dtype)
        outputs = []
        for value in (placed, torch.zeros_like(placed)):
            with replaying(reference.pass_.tape), torch.no_grad():
                outputs.append(norm(value)[0, -1].double())
        return float((outputs[0] - outputs[1]) @ w)

    rows = {"attention": np.zeros((count, n)), "mlp": np.zeros((count, n))}
    for i in range(n):
        plus, minus = Capture(), Capture()
        d = reference.direction(i)
        reference.frozen(reference.x + d, plus)
        reference.frozen(reference.x - d, minus)
        for kind, table in rows.items():
            for layer in range(count):
                term = (getattr(plus, kind)[layer][0, -1] - getattr(minus, kind)[layer][0, -1]).double() / 2
                table[layer, i] = logit_share(term)
    zero = Capture()
    at_zero = reference.frozen(torch.zeros_like(reference.x), zero).double()
    scale = max(float(np.abs(rows["attention"]).max()), float(np.abs(rows["mlp"]).max()), 1e-300)
    worst = 0.0
    for kind, expected in rows.items():
        got = np.asarray(getattr(matrix, kind), np.float64)
        error = float(np.abs(got - expected).max()) / scale
        assert error <= limit, (
            f"the {kind} rows of the layers x tokens matrix differ by {error:.2e} (limit {limit:.0e})"
        )
        worst = max(worst, error)
        for result in exp.layers:
            block = getattr(result, kind)
            constant = logit_share(getattr(zero, kind)[result.layer][0, -1].double())
            error_c = abs(block.constant - constant) / max(abs(block.logit), scale)
            assert error_c <= limit, f"layer {result.layer} {kind} constant differs from the frozen system at zero"
            total = float(np.asarray(block.per_token, np.float64).sum()) + constant
            error_t = abs(block.logit - total) / max(abs(block.logit), scale)
            assert error_t <= limit, f"layer {result.layer} {kind}: its logit is not its tokens plus its constant"
    # The direct path and the constant outside the blocks, against the frozen system: the logit's linear part
    # w . (F(x) - F(0)) is the direct path plus every row; its constant w . F(0) is every block's constant plus the
    # matrix's own (positions on the direct path, the final norm's bias).
    linear = float((reference.frozen(reference.x).double() - at_zero) @ w)
    split = float(np.sum(matrix.direct, dtype=np.float64) + np.sum(matrix.attention) + np.sum(matrix.mlp))
    error_l = abs(split - linear) / max(abs(linear), scale)
    assert error_l <= limit, (
        f"the layers x tokens matrix: its direct path and rows miss the logit's linear part by {error_l:.2e}"
    )
    blocks = sum(logit_share(getattr(zero, kind)[layer][0, -1].double()) for kind in rows for layer in range(count))
    error_k = abs(matrix.constant - (float(at_zero @ w) - blocks)) / max(abs(linear), scale)
    assert error_k <= limit, (
        f"the layers x tokens matrix: its constant differs from the frozen system at zero by {error_k:.2e}"
    )
    return worst


__all__ = [
    "Reference",
    "check_attributions",
    "check_constant",
    "check_exactness",
    "check_layer_matrix",
    "check_reconstruction",
    "embeddings",
    "model_output",
    "relative",
]
