"""One prediction's forward passes, run once and shared by everything an explanation reads off them.

An :class:`ExplanationPass` holds, for one token sequence and one set of options:

- the served model's own prediction (y, logits, the predicted and the explained token): from the served model's own
  forward pass, or, where the twin is the served model bit for bit (:meth:`ModelContext.twin_is_served`: same precision,
  same attention kernel's values, same gate arithmetic), from the twin's forward pass, which then *is* the served
  model's (one pass instead of two: about a third of ``Explain(top_k=0)`` at 7 tokens). Its logits and the twin's W y
  are read off the LM head in one product, and the reconstruction reuses W y where J x + c is y bit for bit;
- the linear twin's forward pass from the input embeddings x, kept as an autograd graph, so that the whole-output
  explanation (:mod:`linlens.engine.explanation`) and the layer analysis (:mod:`linlens.engine.layers`) take their
  vector-Jacobian products from the same graph; with a layer analysis, the residual stream of every layer is
  recorded on the way (:mod:`linlens.engine.capture`); its key/value cache is kept (the prefix of the last
  position's own graph) only where a last-position spectrum or a layer analysis reads it;
- the coefficients the twin froze (:mod:`linlens.engine.freeze`), so that the frozen system can be evaluated again
  at other inputs (:meth:`ExplanationPass.frozen_output`); for models with bias terms, the affine constant c of
  y = J x + c and the constants of every layer and block term are the frozen system at input zero, computed without
  looking at y, so the reconstruction of an affine model is a real check.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as forward_ad
from transformers import DynamicCache

from linlens.contract import ExplainOptions
from linlens.engine.capture import Capture, capturing
from linlens.engine.context import DTYPES, ModelContext
from linlens.engine.freeze import CoefficientTape, recording, replaying
from linlens.engine.plan import plan
from linlens.engine.position_graph import PositionGraph, build_position_graph, detached_prefix

#: PyTorch's forward-mode AD level is process-wide ("nested forward mode AD is not supported"), so passes running in
#: several threads take turns for their forward-mode JVPs (one forward pass each).
_FORWARD_MODE = threading.Lock()


class ExplanationPass:
    """The forward passes of one explanation; see the module docstring."""

    def __init__(self, context: ModelContext, input_ids: Sequence[int], options: ExplainOptions) -> None:
        started = time.perf_counter()
        self.context = context
        self.options = options
        #: The model's token decoder as this request's options ask it to decode.
        self.decoder = context.decoder.for_request(options)
        self.input_ids = tuple(int(t) for t in input_ids)
        self.ids = torch.tensor(self.input_ids, dtype=torch.long, device=context.device)
        self.n = len(self.input_ids)
        self.dtype = DTYPES[options.precision]
        #: Which graph and method serve each part (the plan admission estimated).
        self.plan = plan(options, self.n, context.shape(self.dtype))
        self.twin = context.twin(options.precision, options.gate_mode)
        #: Whether the twin's forward pass is the served model's own, bit for bit (ModelContext.twin_is_served):
        #: then the prediction is read off it and the served model is not run a second time.
        self.served_by_twin = context.twin_is_served(options.precision, options.gate_mode)
        #: The served model's own final hidden state at the last position (its own forward pass, unless shared).
        y_served = None if self.served_by_twin else context.hidden_states(self.input_ids)[-1]
        base = context.base(self.dtype)
        #: The LM head in the explanation's precision.
        self.head: torch.Tensor = context.head(self.dtype)
        #: The input embeddings x (n, d), the leaf every Jacobian is taken with respect to: the token embeddings as
        #: the embedding module returns them (Gemma's sqrt(d) scaling included). What the model adds to them before
        #: the first layer (GPT-2's learned position embeddings, Granite's embedding multiplier) is part of the
        #: frozen system: position embeddings are a constant and join c.
        self.x: torch.Tensor = base.get_input_embeddings()(self.ids).detach().requires_grad_(True)
        #: Whether a layer analysis follows the whole-output explanation on the same graph.
        self.analyses_layers = options.layers is not None
        #: The residual stream of every layer (recorded only when a layer analysis follows).
        self.capture = Capture()
        #: The coefficients this pass froze, to evaluate the same frozen system at other inputs.
        self.tape = CoefficientTape()
        layers = capturing(self.capture) if self.analyses_layers else contextlib.nullcontext()
        #: Whether anything reads the last position's own graph (a spectrum on it, or a layer analysis): only then
        #: does the pass keep the prefix's keys and values.
        self.keeps_prefix = self.analyses_layers or (self.plan.method is not None and self.plan.on_position_graph)
        cache = DynamicCache() if self.keeps_prefix else None
        with recording(self.tape), layers, torch.enable_grad():
            #: y from the twin: numerically the model's y, and exactly linear (affine) in x.
            out = self.twin.base_model(inputs_embeds=self.x[None], use_cache=self.keeps_prefix, cache=cache)
            self.y: torch.Tensor = out.last_hidden_state[0, -1]
        #: The keys and values of positions 0..n-2, detached: the frozen prefix of the last position's own graph.
        self.prefix = detached_prefix(cache, self.n - 1) if cache is not None else []
        del cache, out
        y = self.y.detach()
        #: W y of the twin's own y (in the served precision), read with the prediction's logits in one product where
        #: the explanation runs in the served precision; the reconstruction reuses it when J x + c is y bit for bit.
        self.logits_of_y: torch.Tensor | None = None
        if y_served is None:
            y_served = y
        if self.dtype == context.decoder.lm_head.dtype:  # the head in the served precision: W y as the model's
            logits, self.logits_of_y = context.logits(y_served, y)
        else:
            logits, _ = context.logits(y_served)
        #: The served model's own answer, which the explanation explains.
        self.prediction = context.prediction(y_served, options.explained_token_id, logits=logits)
        self._position: PositionGraph | None = None
        #: c in y = sum_i J_i x_i + c (zeros for bias-free models) and, with a layer analysis, the constant of every
        #: layer input, layer output and block term at the last position, keyed
        #: ("input" | "layer" | "attention" | "mlp", layer).
        self.constant = torch.zeros_like(self.y.detach())
        self.block_constants: dict[tuple[str, int], torch.Tensor] = {}
        if context.has_bias:
            self._affine_constants()
        self.seconds = time.perf_counter() - started

    def position_graph(self) -> PositionGraph:
        """The last position's own linear graph (:mod:`linlens.engine.position_graph`), built on first use and
        shared by the explanation and the layer analysis; it records the residual stream when a layer analysis
        follows."""
        if self._position is None:
            if not self.keeps_prefix:
                raise RuntimeError("this pass kept no prefix: its plan reads nothing off the last position's graph")
            self._position = build_position_graph(
                self.twin, self.x.detach()[-1], self.prefix, record_layers=self.analyses_layers
            )
        return self._position

    def vjp_chunk(self) -> int:
        """VJPs per batched backward: the options' choice, else one that bounds peak memory."""
        return self.options.vjp_chunk_size or self.context.vjp_chunk(self.n, self.dtype)

    def frozen_output(self, inputs: torch.Tensor, capture: Capture | None = None) -> torch.Tensor:
        """The frozen system at other input embeddings (n, d): the twin with this pass's coefficients, no graph.

        At ``self.x`` it is y; it is exactly affine in ``inputs``. ``capture`` records its residual stream.
        """
        layers = capturing(capture) if capture is not None else contextlib.nullcontext()
        with replaying(self.tape), layers, torch.no_grad():
            out = self.twin.base_model(inputs_embeds=inputs.to(self.x.dtype)[None], use_cache=False)
        return out.last_hidden_state[0, -1]

    def frozen_jvp(self, tangent: torch.Tensor, capture: Capture | None = None) -> torch.Tensor:
        """J t for a tangent t (n, d) of the input embeddings: one forward-mode pass through the frozen system.

        With ``capture``, its recorded tensors are dual: :func:`tangent_of` reads the image of t in each of them.
        """
        layers = capturing(capture) if capture is not None else contextlib.nullcontext()
        x = self.x.detach()
        with _FORWARD_MODE, forward_ad.dual_level(), replaying(self.tape), layers, torch.no_grad():
            dual = forward_ad.make_dual(x, tangent.to(x.dtype))
            out = self.twin.base_model(inputs_embeds=dual[None], use_cache=False).last_hidden_state[0, -1]
            image = forward_ad.unpack_dual(out).tangent
            if capture is not None:
                for tensors in (capture.layer_outputs, capture.attention, capture.mlp):
                    for layer, recorded in tensors.items():
                        tensors[layer] = tangent_of(recorded)
        return image if image is not None else torch.zeros_like(self.y.detach())

    def _affine_constants(self) -> None:
        """The frozen system at input zero: c for y and (with a layer analysis) every recorded layer and block."""
        capture = Capture() if self.analyses_layers else None
        self.constant = self.frozen_output(torch.zeros_like(self.x), capture)
        if capture is not None:
            recorded = (
                ("input", capture.layer_inputs),
                ("layer", capture.layer_outputs),
                ("attention", capture.attention),
                ("mlp", capture.mlp),
            )
            for kind, tensors in recorded:
                for layer, output in tensors.items():
                    self.block_constants[(kind, layer)] = output[0, -1].detach()


def tangent_of(dual: torch.Tensor) -> torch.Tensor:
    """The tangent part of a dual tensor (zeros when it has none: it does not depend on the input)."""
    tangent = forward_ad.unpack_dual(dual).tangent
    return tangent.detach() if tangent is not None else torch.zeros_like(forward_ad.unpack_dual(dual).primal)


__all__ = ["ExplanationPass", "tangent_of"]
