"""The engine's entry point: explain one next-token prediction of a model, exactly, optionally layer by layer.

An :class:`Explainer` is bound to one loaded model (through a :class:`~linlens.engine.context.ModelContext`). Each
call checks the request against the model once, runs the prediction's forward passes once
(:class:`~linlens.engine.forward.ExplanationPass`), reads the whole-output explanation off them
(:mod:`linlens.engine.explanation`) and, when asked, the layer analysis off the same graph
(:mod:`linlens.engine.layers`). It is safe to call from several threads at once, also while other threads generate
with the same model, which it never modifies.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from transformers import PreTrainedModel

from linlens.contract import (
    ExplainOptions,
    Explanation,
    LayerAttributions,
    LayerResult,
    OptionError,
    Precision,
    Timings,
)
from linlens.engine import jacobian as jac
from linlens.engine.context import DTYPES, ModelContext
from linlens.engine.explanation import explain_output
from linlens.engine.forward import ExplanationPass
from linlens.engine.layers import analyze_layers, last_position_chain
from linlens.engine.plan import plan
from linlens.engine.sequence import StepProgress, explain_steps, shares_pass

#: What an explanation hands to ``on_event`` as it goes: the whole-output explanation first, then (with a layer
#: analysis) the layers x tokens matrix and each selected layer's result.
ExplanationEvent = Explanation | LayerAttributions | LayerResult


def check_token_id(token_id: int, vocab_size: int, field: str) -> int:
    """``token_id`` if it is a token of a vocabulary of ``vocab_size``, else OptionError naming ``field``."""
    if not 0 <= token_id < vocab_size:
        raise OptionError(field, f"= {token_id} is not a token id of this model (valid: 0..{vocab_size - 1})")
    return int(token_id)


class Explainer:
    """Explains next-token predictions of one model exactly, through its detached Jacobian."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: Any, *, vjp_memory_bytes: int = jac.DEFAULT_VJP_MEMORY_BYTES
    ) -> None:
        self.context = ModelContext(model, tokenizer, vjp_memory_bytes=vjp_memory_bytes)
        self.model = model
        self.hidden_size = self.context.hidden_size
        self.vocab_size = self.context.vocab_size
        self.num_layers = self.context.num_layers
        self.has_bias = self.context.has_bias
        #: The linear twin for a precision and gate mode (None: the ordinary twin), built once and cached.
        self.twin = self.context.twin

    def validate(self, input_ids: Sequence[int], options: ExplainOptions) -> None:
        """Check a request against this model; OptionError names the first option (or input) that does not fit.

        The options' own rules (``top_k >= 0``, ...) were checked when they were built; these are the ones that need
        the model. The service calls this at admission, before the request takes a queue slot.
        """
        if not input_ids:
            raise OptionError("input", "is empty: give at least one token")
        for position, token in enumerate(input_ids):
            check_token_id(int(token), self.vocab_size, f"input[{position}]")
        if options.top_k > self.hidden_size:
            raise OptionError("top_k", f"is {options.top_k}, above the model's hidden size {self.hidden_size}")
        if options.explained_token_id is not None:
            check_token_id(options.explained_token_id, self.vocab_size, "explained_token_id")
        for i, target in enumerate(options.attribution_targets):
            check_token_id(target.token_id, self.vocab_size, f"targets[{i}].token_id")
            if target.contrast_token_id is not None:
                check_token_id(target.contrast_token_id, self.vocab_size, f"targets[{i}].contrast_token_id")
        if options.vjp_chunk_size is not None and options.vjp_chunk_size > self.hidden_size:
            raise OptionError(
                "vjp_chunk_size",
                f"is {options.vjp_chunk_size}, above the model's hidden size {self.hidden_size} (a Jacobian has "
                "hidden_size rows, so no batch holds more VJPs than that)",
            )
        if options.precision is Precision.BFLOAT16 and self.context.device.type == "cpu":
            raise OptionError("precision", "BFLOAT16 needs an accelerator; on a CPU use FLOAT32 or FLOAT64")
        if options.layers is not None:
            try:
                options.layers.selected(self.num_layers)
            except OptionError as error:
                raise error.under("layers") from None
            if options.layers.top_k > self.hidden_size:
                raise OptionError(
                    "layers.top_k", f"is {options.layers.top_k}, above the model's hidden size {self.hidden_size}"
                )

    def memory_estimate(self, n_tokens: int, options: ExplainOptions, *, steps: int = 1) -> jac.MemoryEstimate:
        """An upper bound of the memory an explanation of ``n_tokens`` tokens with ``options`` needs beyond the
        model (forward graph, batched VJPs, Jacobians). The server refuses a request above its budget with this
        before any work starts; ``vjp_chunk_size`` counts towards it. ``steps``: the explained steps of a generation
        whose longest prefix has ``n_tokens`` tokens (:meth:`explain_steps`)."""
        shape = self.context.shape(DTYPES[options.precision])
        return self.context.memory_estimate(n_tokens, options, plan(options, n_tokens, shape), steps=steps)

    def explain(
        self,
        input_ids: Sequence[int],
        options: ExplainOptions | None = None,
        *,
        should_stop: jac.ShouldStop | None = None,
        on_progress: jac.OnPhaseProgress | None = None,
        on_event: Callable[[ExplanationEvent], None] | None = None,
    ) -> Explanation:
        """Explain the next-token prediction after ``input_ids``; see :class:`ExplainOptions` for what is computed.

        The returned Explanation carries the layer analysis when ``options.layers`` is set. ``on_event`` sees each
        part as soon as it is computed (the explanation without its layers, then the matrix, then each layer), so a
        stream can forward them live. ``should_stop`` is polled between batches of VJPs and between layers (raising
        :class:`~linlens.engine.jacobian.ExplanationCancelled`); ``on_progress`` receives (phase, products done,
        products planned) after each batch of products: phase "jacobian", "spectra" (matrix-free) or "layers".
        """
        options = options or ExplainOptions()
        self.validate(input_ids, options)
        explanation_pass = ExplanationPass(self.context, input_ids, options)
        # The layer chain, when the plan takes it, runs first: its last map is J_n, the last position's spectrum.
        started = time.perf_counter()
        chain = (
            last_position_chain(explanation_pass, options.layers, should_stop) if options.layers is not None else None
        )
        chain_ms = (time.perf_counter() - started) * 1000.0
        explanation = explain_output(
            explanation_pass,
            should_stop=should_stop,
            on_progress=on_progress,
            last_jacobian=chain.last_jacobian if chain is not None else None,
        )
        if on_event is not None:
            on_event(explanation)
        if options.layers is None:
            return explanation
        started = time.perf_counter()
        matrix: LayerAttributions | None = None
        layers: list[LayerResult] = []
        events = analyze_layers(
            explanation_pass, options.layers, should_stop=should_stop, on_progress=on_progress, chain=chain
        )
        for event in events:
            if isinstance(event, LayerAttributions):
                matrix = event
            else:
                layers.append(event)
            if on_event is not None:
                on_event(event)
        spent = Timings(layers_ms=(time.perf_counter() - started) * 1000.0 + chain_ms)
        timings = explanation.timings + dataclasses.replace(spent, total_ms=spent.layers_ms)
        return dataclasses.replace(explanation, layer_attributions=matrix, layers=tuple(layers), timings=timings)

    def explain_steps(
        self,
        ids: Sequence[int],
        lengths: Sequence[int],
        options: ExplainOptions | None = None,
        *,
        should_stop: jac.ShouldStop | None = None,
        on_progress: StepProgress | None = None,
        on_event: Callable[[int, ExplanationEvent], None] | None = None,
    ) -> Iterator[Explanation]:
        """Explain the token ``ids[n]`` after each prefix ``ids[:n]`` for the increasing prefix lengths ``lengths``
        (an explained generation's steps), yielding each step's explanation in order as soon as it is ready.

        Each equals ``explain(ids[:n], options with explained_token_id=ids[n])`` to rounding. Where the options
        allow it (:func:`linlens.engine.sequence.shares_pass`), the steps share one pass over the longest prefix
        (:mod:`linlens.engine.sequence`) instead of redoing the prefix's work at every step. ``on_progress(index)``
        gives the progress callback of step ``index``; ``on_event(index, event)`` sees each step's parts as they
        are computed, as ``explain``'s ``on_event`` does.
        """
        options = options or ExplainOptions()
        if not lengths:
            return
        self.validate(list(ids)[: max(lengths) + 1], options)
        if not all(1 <= n < len(ids) for n in lengths):
            raise OptionError("lengths", f"prefix lengths {list(lengths)} must lie within 1..{len(ids) - 1}")
        if list(lengths) == sorted(set(lengths)) and shares_pass(self.context, options, lengths):
            steps = explain_steps(self.context, ids, lengths, options, should_stop=should_stop, on_progress=on_progress)
            for index, explanation in enumerate(steps):
                if on_event is not None:
                    on_event(index, explanation)
                yield explanation
            return
        for index, n in enumerate(lengths):

            def forward(event: ExplanationEvent, index: int = index) -> None:
                if on_event is not None:
                    on_event(index, event)

            yield self.explain(
                list(ids)[:n],
                dataclasses.replace(options, explained_token_id=int(ids[n])),
                should_stop=should_stop,
                on_progress=on_progress(index) if on_progress is not None else None,
                on_event=forward,
            )


__all__ = ["Explainer", "ExplanationEvent", "check_token_id"]
