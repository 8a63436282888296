"""One explanation pass: the model's own prediction, its exact linear system, and everything read off it.

An :class:`Explainer` is bound to one loaded model. It never modifies that model: explanation passes run on linear
twins (see :mod:`linlens.engine.linearize`) that share its weights, built lazily once per precision and gate mode.
It is safe to call from several threads at once, also while other threads generate with the same model.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from linlens.engine import jacobian as jac
from linlens.engine.decode import TokenDecoder
from linlens.engine.families import Family, family_of
from linlens.engine.layers import LayerEvent, analyze_layers, validate_layer_options
from linlens.engine.linearize import build_twin
from linlens.engine.results import (
    Attribution,
    AttributionTarget,
    ExplainOptions,
    Explanation,
    GateMode,
    LayerOptions,
    OrdinaryContrast,
    PositionSelection,
    PositionSpectrum,
    Precision,
    PredictedToken,
    Reconstruction,
    SingularComponent,
    Timings,
)
from linlens.engine.spectra import decompose, truncated_relative_errors


@dataclass(frozen=True)
class Prediction:
    """What the served model itself computed for a token sequence."""

    y_model: torch.Tensor
    logits: torch.Tensor
    predicted: PredictedToken
    explained: PredictedToken


_DTYPES = {Precision.FLOAT32: torch.float32, Precision.FLOAT64: torch.float64, Precision.BFLOAT16: torch.bfloat16}


def _relative(error: torch.Tensor, reference: torch.Tensor) -> float:
    return float(error.double().norm() / reference.double().norm().clamp_min(1e-300))


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().copy()


class Explainer:
    """Explains next-token predictions of one model exactly, through its detached Jacobian."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: Any, *, vjp_memory_bytes: int = jac.DEFAULT_VJP_MEMORY_BYTES
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.family: Family = family_of(type(model).__name__)
        self.vjp_memory_bytes = vjp_memory_bytes
        config = model.config
        self.hidden_size: int = config.hidden_size
        self.vocab_size: int = config.vocab_size
        self.num_layers: int = config.num_hidden_layers
        self._intermediate: int = getattr(config, "intermediate_size", 4 * self.hidden_size)
        self._heads: int = config.num_attention_heads
        self._softcap: float | None = getattr(config, "final_logit_softcapping", None)
        self.has_bias = any(isinstance(m, nn.Linear) and m.bias is not None for m in model.base_model.modules())
        output_embeddings = model.get_output_embeddings()
        if output_embeddings is None or getattr(output_embeddings, "bias", None) is not None:
            raise ValueError("the engine needs a bias-free LM head to map y to logits")
        input_embeddings = model.get_input_embeddings().weight
        assert isinstance(input_embeddings, torch.Tensor)
        self.decoder = TokenDecoder(tokenizer, output_embeddings.weight, input_embeddings)
        self._lock = threading.Lock()
        self._bases: dict[torch.dtype, PreTrainedModel] = {}
        self._twins: dict[tuple[torch.dtype, GateMode | None], PreTrainedModel] = {}

    # -- twins -------------------------------------------------------------------------------------------------

    def _base(self, dtype: torch.dtype) -> PreTrainedModel:
        """The served model itself, or (once, cached) a copy of it in another precision for explanations."""
        if next(self.model.parameters()).dtype == dtype:
            return self.model
        with self._lock:
            if dtype not in self._bases:
                twin_base: Any = copy.deepcopy(self.model)
                self._bases[dtype] = twin_base.to(dtype).requires_grad_(False).eval()
            return self._bases[dtype]

    def twin(self, precision: Precision, mode: GateMode | None) -> PreTrainedModel:
        """The linear twin for a precision and gate mode (None: the ordinary, undetached twin), built once."""
        dtype = _DTYPES[precision]
        base = self._base(dtype)
        with self._lock:
            key = (dtype, mode)
            if key not in self._twins:
                self._twins[key] = build_twin(base, mode)
            return self._twins[key]

    # -- validation --------------------------------------------------------------------------------------------

    def _validate(self, input_ids: Sequence[int], options: ExplainOptions) -> None:
        if len(input_ids) == 0:
            raise ValueError("cannot explain an empty token sequence")
        bad = [t for t in input_ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if options.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if options.tokens_per_vector < 1:
            raise ValueError("tokens_per_vector must be >= 1")
        if options.vjp_chunk_size is not None and options.vjp_chunk_size < 1:
            raise ValueError("vjp_chunk_size must be >= 1")
        ids = [options.explained_token_id] if options.explained_token_id is not None else []
        for target in options.targets:
            ids.append(target.token_id)
            if target.contrast_token_id is not None:
                ids.append(target.contrast_token_id)
        bad = [t for t in ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise ValueError(f"target token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if options.precision is Precision.BFLOAT16 and next(self.model.parameters()).device.type == "cpu":
            raise ValueError("bfloat16 explanations need an accelerator; use float32 or float64 on a CPU")

    # -- the pass ----------------------------------------------------------------------------------------------

    def twin_for(self, options: ExplainOptions) -> tuple[PreTrainedModel, PreTrainedModel, torch.dtype]:
        """(linear twin, the model it shares weights with, dtype) for the options' precision and gate mode."""
        dtype = _DTYPES[options.precision]
        return self.twin(options.precision, options.gate_mode), self._base(dtype), dtype

    def predict(self, input_ids: Sequence[int], options: ExplainOptions) -> Prediction:
        """The served model's own, unmodified forward pass: y, the logits, the top token and the explained one."""
        device = next(self.model.parameters()).device
        ids = torch.tensor([int(t) for t in input_ids], dtype=torch.long, device=device)
        with torch.no_grad():
            y_model = self.model.base_model(input_ids=ids[None], use_cache=False).last_hidden_state[0, -1]
            logits = self.decoder.lm_head @ y_model
            shown = logits.float()
            if self._softcap is not None:
                shown = torch.tanh(shown / self._softcap) * self._softcap
            probabilities = torch.softmax(shown, dim=-1)
        predicted_id = int(torch.argmax(shown))
        explained_id = predicted_id if options.explained_token_id is None else int(options.explained_token_id)

        def token(token_id: int) -> PredictedToken:
            return PredictedToken(
                token_id=token_id,
                text=self.decoder.text(token_id),
                logit=float(logits[token_id]),
                probability=float(probabilities[token_id]),
            )

        return Prediction(y_model, logits, token(predicted_id), token(explained_id))

    def explain_layers(
        self,
        input_ids: Sequence[int],
        options: ExplainOptions | None = None,
        layer_options: LayerOptions | None = None,
        *,
        should_stop: jac.ShouldStop | None = None,
        on_progress: jac.OnProgress | None = None,
    ) -> Iterator[LayerEvent]:
        """Layer-by-layer analysis (see :mod:`linlens.engine.layers`): first the layers x tokens attribution matrix,
        then one LayerResult per selected layer, each yielded as soon as it is computed."""
        options = options or ExplainOptions()
        layer_options = layer_options or LayerOptions()
        self._validate(input_ids, options)
        validate_layer_options(layer_options, self.num_layers, self.hidden_size)
        return analyze_layers(
            self, [int(t) for t in input_ids], options, layer_options, should_stop=should_stop, on_progress=on_progress
        )

    def explain(
        self,
        input_ids: Sequence[int],
        options: ExplainOptions | None = None,
        *,
        should_stop: jac.ShouldStop | None = None,
        on_progress: jac.OnProgress | None = None,
    ) -> Explanation:
        """Explain the next-token prediction after ``input_ids``; see :class:`ExplainOptions` for what is computed.

        ``should_stop`` is polled between batches of VJPs (raising :class:`ExplanationCancelled`), ``on_progress``
        receives (VJPs done, VJPs in total) for the full Jacobian(s).
        """
        options = options or ExplainOptions()
        self._validate(input_ids, options)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        device = next(self.model.parameters()).device
        ids = torch.tensor([int(t) for t in input_ids], dtype=torch.long, device=device)
        n, d = ids.shape[0], self.hidden_size

        # 1. The model's own, unmodified forward pass: it makes the prediction being explained.
        prediction = self.predict(input_ids, options)
        y_model, logits = prediction.y_model, prediction.logits
        predicted_id = prediction.predicted.token_id
        explained_id = prediction.explained.token_id

        # 2. The detached forward pass of the linear twin, in the requested precision.
        twin, base, dtype = self.twin_for(options)
        head = base.get_output_embeddings().weight.detach()
        x = base.get_input_embeddings()(ids).detach().requires_grad_(True)

        def detached_output(inputs: torch.Tensor) -> torch.Tensor:
            return twin.base_model(inputs_embeds=inputs[None], use_cache=False).last_hidden_state[0, -1]

        need_full = options.top_k > 0 or options.include_jacobians
        with torch.enable_grad():
            y = detached_output(x)
            constant = torch.zeros_like(y.detach())
            if self.has_bias:
                constant = y.detach() - jac.jacobian_vector_product(detached_output, x)
        timings["forward"] = time.perf_counter() - started

        # 3. Exact attributions: one batched VJP with a cotangent per target (logit rows, or differences of rows).
        tick = time.perf_counter()
        targets = (AttributionTarget(explained_id), *options.targets)
        directions = torch.stack(
            [head[t.token_id] - (head[t.contrast_token_id] if t.contrast_token_id is not None else 0) for t in targets]
        )
        with torch.enable_grad():
            products = jac.cotangent_products(y, x, directions, retain_graph=need_full)
        per_token = (products * x.detach()[None]).sum(dim=-1)  # (T, n)
        attributions = []
        for target, direction, row in zip(targets, directions, per_token, strict=True):
            total = float(direction.to(y_model.dtype) @ y_model)
            constant_part = float(direction @ constant)
            error = abs(float(row.sum()) + constant_part - total) / max(abs(total), 1e-30)
            label = self.decoder.text(target.token_id)
            if target.contrast_token_id is not None:
                label = f"{label} vs {self.decoder.text(target.contrast_token_id)}"
            attributions.append(Attribution(target, label, _numpy(row), constant_part, total, error))
        timings["attribution"] = time.perf_counter() - tick
        vjp_count = len(targets)

        # 4. The full Jacobian, when the answer needs it: d VJPs, batched to bound memory.
        reconstruction: Reconstruction | None = None
        spectra: tuple[PositionSpectrum, ...] = ()
        truncated: tuple[float, ...] = ()
        jacobians_out: np.ndarray | None = None
        if need_full:
            tick = time.perf_counter()
            chunk = options.vjp_chunk_size or self._chunk(n, dtype)
            with torch.enable_grad():
                full = jac.full_jacobian(y, x, chunk=chunk, should_stop=should_stop, on_progress=on_progress)
            per_position = full.permute(1, 0, 2).contiguous()  # (n, d_out, d_in): per_position[i] = J_i
            del full
            vjp_count += d
            timings["jacobian"] = time.perf_counter() - tick
            xs = x.detach()
            y_linear = torch.einsum("nod,nd->o", per_position, xs) + constant
            logits_linear = head @ y_linear
            linear_id = int(torch.argmax(logits_linear))
            reconstruction = Reconstruction(
                relative_error_vs_model=_relative(y_linear.double() - y_model.double(), y_model),
                relative_error_vs_detached=_relative(y_linear - y.detach(), y.detach()),
                max_abs_logit_error=float((logits_linear.double() - logits.double()).abs().max()),
                predicts_same_token=linear_id == predicted_id,
                linear_token_id=linear_id,
            )
            if options.top_k > 0:
                spectra, truncated = self._spectra(per_position, xs, y.detach(), constant, ids, options, timings)
            if options.include_jacobians:
                jacobians_out = _numpy(per_position)
            del per_position

        # 5. The ordinary Jacobian for contrast: same arithmetic, nothing detached, so it does not reconstruct y.
        ordinary: OrdinaryContrast | None = None
        if options.ordinary_contrast:
            tick = time.perf_counter()
            plain = self.twin(options.precision, None)
            x_plain = x.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                y_plain = plain.base_model(inputs_embeds=x_plain[None], use_cache=False).last_hidden_state[0, -1]
                full = jac.full_jacobian(
                    y_plain, x_plain, chunk=options.vjp_chunk_size or self._chunk(n, dtype), should_stop=should_stop
                )
            y_ordinary = torch.einsum("ond,nd->o", full, x_plain.detach())
            ordinary = OrdinaryContrast(
                relative_error_vs_model=_relative(y_ordinary.double() - y_model.double(), y_model),
                predicts_same_token=int(torch.argmax(head @ y_ordinary)) == predicted_id,
            )
            del full
            vjp_count += d
            timings["ordinary"] = time.perf_counter() - tick

        return Explanation(
            input_ids=tuple(int(t) for t in input_ids),
            input_tokens=self.decoder.texts([int(t) for t in input_ids]),
            predicted=prediction.predicted,
            explained=prediction.explained,
            y=_numpy(y_model.to(dtype)),
            constant=_numpy(constant),
            has_bias=self.has_bias,
            reconstruction=reconstruction,
            attributions=tuple(attributions),
            spectra=spectra,
            truncated_relative_error=truncated,
            jacobians=jacobians_out,
            ordinary=ordinary,
            precision=options.precision,
            gate_mode=options.gate_mode,
            timings=Timings(**timings),
            vjp_count=vjp_count,
        )

    def _chunk(self, n_tokens: int, dtype: torch.dtype) -> int:
        return jac.vjp_chunk_size(
            n_tokens=n_tokens,
            hidden=self.hidden_size,
            intermediate=self._intermediate,
            layers=self.num_layers,
            heads=self._heads,
            itemsize=torch.empty((), dtype=dtype).element_size(),
            budget=self.vjp_memory_bytes,
        )

    def _spectra(
        self,
        per_position: torch.Tensor,
        xs: torch.Tensor,
        y: torch.Tensor,
        constant: torch.Tensor,
        ids: torch.Tensor,
        options: ExplainOptions,
        timings: dict[str, float],
    ) -> tuple[tuple[PositionSpectrum, ...], tuple[float, ...]]:
        """SVD of the selected J_i, their decoded singular vectors, and (for all positions) the rank-k truncation."""
        tick = time.perf_counter()
        n = per_position.shape[0]
        positions = list(range(n)) if options.positions is PositionSelection.ALL else [n - 1]
        decomposed = decompose(per_position[positions], xs[positions], y, options.top_k)
        truncated: tuple[float, ...] = ()
        if options.positions is PositionSelection.ALL:
            truncated = tuple(truncated_relative_errors(decomposed, per_position, xs, constant, y))
        timings["svd"] = time.perf_counter() - tick

        tick = time.perf_counter()
        results = []
        for position, spectrum in zip(positions, decomposed, strict=True):
            left_tokens = self.decoder.output_tokens(spectrum.left, options.tokens_per_vector)
            right_tokens = self.decoder.input_tokens(spectrum.right, options.tokens_per_vector)
            components = tuple(
                SingularComponent(
                    rank=k + 1,
                    value=float(spectrum.values[k]),
                    left=_numpy(spectrum.left[:, k]),
                    right=_numpy(spectrum.right[:, k]),
                    left_tokens=left_tokens[k],
                    right_tokens=right_tokens[k],
                )
                for k in range(spectrum.left.shape[-1])
            )
            token_id = int(ids[position])
            results.append(
                PositionSpectrum(
                    position=position,
                    token_id=token_id,
                    token_text=self.decoder.text(token_id),
                    components=components,
                    singular_values=_numpy(spectrum.values),
                    captured_share=tuple(float(v) for v in spectrum.captured_share),
                    stable_rank=spectrum.stable_rank,
                    term_norm=spectrum.term_norm,
                )
            )
        timings["decode"] = time.perf_counter() - tick
        return tuple(results), truncated
