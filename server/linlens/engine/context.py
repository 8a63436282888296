"""What every explanation pass of one model shares: its dimensions, its linear twins, its token decoder, and the
served model's own prediction.

A :class:`ModelContext` is built once per loaded model. It never modifies the model: explanation passes run on
linear twins (:mod:`linlens.engine.linearize`) that share its weights, built lazily once per precision and gate mode
and cached here. It is safe to use from several threads at once, also while other threads generate with the model.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from linlens.contract import ExplainMethod, ExplainOptions, GateMode, PositionSelection, Precision, PredictedToken
from linlens.engine import jacobian as jac
from linlens.engine.capture import decoder_layers
from linlens.engine.decode import TokenDecoder
from linlens.engine.families import Family, UnsupportedArchitectureError, family_of
from linlens.engine.freeze import CoefficientTape, recording
from linlens.engine.last_position import chain_block
from linlens.engine.linearize import build_twin
from linlens.engine.matrix_free import MAX_ITERATIONS
from linlens.engine.plan import ExplanationPlan, ModelShape, block_size

DTYPES = {Precision.FLOAT32: torch.float32, Precision.FLOAT64: torch.float64, Precision.BFLOAT16: torch.bfloat16}

#: Prompt lengths on which :meth:`ModelContext.twin_is_served` compares the twin with the served model: a short one
#: and one longer than the tiny test models' sliding window (4), so that masks of both kinds are exercised.
TWIN_PROBE_LENGTHS = (3, 13)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What the served model itself computed for a token sequence."""

    #: The output embedding y (final hidden state, last position, after the final norm).
    y_model: torch.Tensor
    logits: torch.Tensor
    predicted: PredictedToken
    explained: PredictedToken


class ModelContext:
    """One loaded model as the engine sees it."""

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
        head_size = getattr(config, "head_dim", None) or self.hidden_size // self._heads
        #: Query heads x head size, and key/value heads x head size (the memory estimate's attention widths).
        self._attention_width: int = self._heads * head_size
        self._kv_width: int = (getattr(config, "num_key_value_heads", None) or self._heads) * head_size
        self.softcap: float | None = getattr(config, "final_logit_softcapping", None)
        #: logits = (W y) * logit_multiplier (Granite's 1 / logits_scaling, Cohere's logit_scale; else 1).
        self.logit_multiplier = float(self.family.logit_multiplier(config))
        #: Whether y = J x + c has a constant at all: bias terms anywhere, or learned position embeddings.
        self.has_bias = self.family.learned_positions or any(
            isinstance(getattr(m, "bias", None), nn.Parameter) for m in model.base_model.modules()
        )
        output_embeddings = model.get_output_embeddings()
        if output_embeddings is None or getattr(output_embeddings, "bias", None) is not None:
            raise ValueError("the engine needs a bias-free LM head to map y to logits")
        input_embeddings = model.get_input_embeddings().weight
        assert isinstance(input_embeddings, torch.Tensor)
        self.decoder = TokenDecoder(tokenizer, self.logit_head(output_embeddings.weight), input_embeddings)
        self._check_logits()
        self._lock = threading.Lock()
        self._layer_weights: int | None = None
        self._bases: dict[torch.dtype, PreTrainedModel] = {}
        self._twins: dict[tuple[torch.dtype, GateMode | None], PreTrainedModel] = {}
        self._twin_is_served: dict[tuple[torch.dtype, GateMode | None], bool] = {}
        self._logit_heads: dict[torch.dtype, torch.Tensor] = {}

    def logit_head(self, weight: torch.Tensor) -> torch.Tensor:
        """The LM head as it maps y to logits: its weight times the family's logit multiplier (no copy when 1)."""
        weight = weight.detach()
        return weight * self.logit_multiplier if self.logit_multiplier != 1.0 else weight

    def head(self, dtype: torch.dtype) -> torch.Tensor:
        """The LM head as it maps y to logits in ``dtype``, built once per precision and shared by every request:
        with a logit multiplier (Granite, Cohere) or in another precision than the served one it is a copy of the
        whole head (vocabulary x hidden), which no request should redo."""
        if dtype == self.decoder.lm_head.dtype:
            return self.decoder.lm_head
        with self._lock:
            known = self._logit_heads.get(dtype)
        if known is not None:
            return known
        weight = self.base(dtype).get_output_embeddings().weight
        assert isinstance(weight, torch.Tensor)
        head = self.logit_head(weight)
        with self._lock:
            return self._logit_heads.setdefault(dtype, head)

    def _check_logits(self) -> None:
        """Refuse a model whose logits are not (W y) * multiplier (soft-capped where the config says so): the
        explanation splits that logit, so an unknown scaling would make every attribution wrong."""
        ids = torch.arange(1, 4, device=self.device).clamp_max(self.vocab_size - 1)
        with torch.no_grad():
            expected = self.model(input_ids=ids[None], use_cache=False).logits[0, -1].double()
            y = self.model.base_model(input_ids=ids[None], use_cache=False).last_hidden_state[0, -1]
            ours = (self.decoder.lm_head @ y).double()
            if self.softcap is not None:
                ours = torch.tanh(ours / self.softcap) * self.softcap
        error = float((expected - ours).norm() / expected.norm().clamp_min(1e-30))
        half = next(self.model.parameters()).dtype in (torch.float16, torch.bfloat16)
        if not error <= (3e-2 if half else 1e-3):
            raise UnsupportedArchitectureError(
                f"{type(self.model).__name__}: its logits are not the LM head applied to the final hidden state "
                f"(relative difference {error:.1e}); refusing to explain it"
            )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- twins -------------------------------------------------------------------------------------------------

    def base(self, dtype: torch.dtype) -> PreTrainedModel:
        """The served model itself, or (once, cached) a copy of it in another precision for explanations."""
        if next(self.model.parameters()).dtype == dtype:
            return self.model
        with self._lock:
            if dtype not in self._bases:
                copied: Any = copy.deepcopy(self.model)
                self._bases[dtype] = copied.to(dtype).requires_grad_(False).eval()
            return self._bases[dtype]

    def twin(self, precision: Precision, mode: GateMode | None) -> PreTrainedModel:
        """The linear twin for a precision and gate mode (None: the ordinary, undetached twin), built once."""
        dtype = DTYPES[precision]
        base = self.base(dtype)
        with self._lock:
            key = (dtype, mode)
            if key not in self._twins:
                self._twins[key] = build_twin(base, mode, served=base is self.model)
            return self._twins[key]

    def twin_is_served(self, precision: Precision, mode: GateMode | None) -> bool:
        """Whether the twin for ``precision`` and ``mode`` computes the served model's own numbers, bit for bit, so
        that an explanation's forward pass through it *is* the served model's forward pass (checked once per twin).

        Decision (issue 17): the explanation's prediction must be the served model's own answer, and its reconstruction
        error a real check against that answer. Where the twin is the served model in the same precision, and every
        operation it runs is the operation the served model runs (the same weights, the same norm and gate arithmetic,
        the same attention kernel's values: freezing a coefficient detaches it, it does not change its value; a model
        served with SDPA gets a twin whose attention values are SDPA's own,
        :func:`~linlens.engine.linearize.served_sdpa_linear_attention`), its y *is* the served model's y, and a second
        forward pass through the served model would only recompute the same bits: the pass then reads the prediction off
        the twin's own forward (:class:`~linlens.engine.forward.ExplanationPass`), and the reconstruction error against
        it stays the same real check (J x from the graph's derivative, against those bits).

        That identity is a fact to establish, not to assume: it fails wherever the served model runs another precision,
        a gate mode whose frozen arithmetic rounds differently (FREEZE_UP computes act(g) as g * s(g); GPT-2's and
        GPT-NeoX's non-gated MLPs freeze s(h) of gelu(h) = h * s(h)), a mixture of experts (the twin runs the experts'
        eager loop), or an attention kernel the twin does not reproduce (any but eager and SDPA). So it is measured here
        once per twin, on probe prompts, through the same kind of call the pass makes (a coefficient tape, gradients on,
        with a key/value cache and without), and must agree exactly at every position of every probe; anything else
        keeps the served model's separate forward pass.
        """
        dtype = DTYPES[precision]
        key = (dtype, mode)
        with self._lock:
            known = self._twin_is_served.get(key)
        if known is not None:
            return known
        same = False
        if mode is not None and self.base(dtype) is self.model:
            twin = self.twin(precision, mode)
            embeddings = self.model.get_input_embeddings()
            same = True
            for index, length in enumerate(TWIN_PROBE_LENGTHS):
                ids = (torch.arange(length, device=self.device) * 7 + 3) % self.vocab_size
                served = self.hidden_states([int(t) for t in ids])
                with recording(CoefficientTape()), torch.enable_grad():
                    x = embeddings(ids).detach().requires_grad_(True)
                    cached = index % 2 == 0  # the pass runs with a key/value cache or without one: probe both
                    cache = DynamicCache() if cached else None
                    out = twin.base_model(inputs_embeds=x[None], use_cache=cached, cache=cache)
                same = same and torch.equal(out.last_hidden_state[0].detach(), served)
        with self._lock:
            self._twin_is_served[key] = same
        return same

    # -- the served model's own answer -------------------------------------------------------------------------

    def predict(self, input_ids: Sequence[int], explained_token_id: int | None = None) -> Prediction:
        """The served model's own, unmodified forward pass: y, the logits, the top token and the explained one."""
        return self.prediction(self.hidden_states(input_ids)[-1], explained_token_id)

    def logits(self, y_model: torch.Tensor, other: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(W y_model, W other) in the served precision, from one product with the LM head (``other`` None: y_model).

        Always the same product, a pair of vectors, whatever the request: the logits a prediction reports must not
        depend on its options (tests/test_engine_layers.py compares them across requests to 1e-9), and a row of a
        product depends only on its own vector and the product's shape. A pair costs one read of the head, which is
        what costs at a few tokens (113 MB for SmolLM2): measured 4.7 ms for the pair against 7.3 ms for one
        matrix-vector product (MKL, one thread), so an explanation gets the twin's W y with the prediction's for less
        than the prediction alone cost before."""
        head = self.decoder.lm_head
        pair = torch.stack([y_model, y_model if other is None else other]).to(head.dtype)
        with torch.no_grad():
            both = head @ pair.T  # (vocab, 2): the head read once, row-major against a column pair
        return both[:, 0], both[:, 1]

    def hidden_states(self, input_ids: Sequence[int]) -> torch.Tensor:
        """The served model's final hidden states (after the final norm) at every position, (n, d), no graph: one
        forward serves the predictions after every prefix (causality), as an explained generation reads them."""
        ids = torch.tensor([int(t) for t in input_ids], dtype=torch.long, device=self.device)
        with torch.no_grad():
            return self.model.base_model(input_ids=ids[None], use_cache=False).last_hidden_state[0]

    def prediction(
        self, y_model: torch.Tensor, explained_token_id: int | None = None, *, logits: torch.Tensor | None = None
    ) -> Prediction:
        """The prediction read off the served model's y at one position: the logits (given, or W y), the top and
        the explained token."""
        with torch.no_grad():
            if logits is None:
                logits, _ = self.logits(y_model)
            shown = logits.float()
            if self.softcap is not None:
                shown = torch.tanh(shown / self.softcap) * self.softcap
            probabilities = torch.softmax(shown, dim=-1)
        predicted_id = int(torch.argmax(shown))
        explained_id = predicted_id if explained_token_id is None else int(explained_token_id)

        def token(token_id: int) -> PredictedToken:
            return PredictedToken(
                token_id=token_id,
                text=self.decoder.text(token_id),
                logit=float(logits[token_id]),
                probability=float(probabilities[token_id]),
            )

        return Prediction(y_model, logits, token(predicted_id), token(explained_id))

    # -- memory ------------------------------------------------------------------------------------------------

    def vjp_chunk(self, n_tokens: int, dtype: torch.dtype) -> int:
        """VJPs per batched backward that keep one batch within the memory budget."""
        return jac.vjp_chunk_size(**self._geometry(n_tokens, dtype), budget=self.vjp_memory_bytes)

    def _geometry(self, n_tokens: int, dtype: torch.dtype) -> dict[str, int]:
        """What the memory arithmetic of jacobian.py needs to know of this model and input."""
        return {
            "n_tokens": n_tokens,
            "hidden": self.hidden_size,
            "intermediate": self._intermediate,
            "layers": self.num_layers,
            "heads": self._heads,
            "itemsize": torch.empty((), dtype=dtype).element_size(),
        }

    def shape(self, dtype: torch.dtype) -> ModelShape:
        """What an explanation plan needs to know of this model, for explanations in ``dtype``."""
        if self._layer_weights is None:
            layers = decoder_layers(self.model, self.family)
            self._layer_weights = sum(p.numel() for p in layers.parameters())
        return ModelShape(
            hidden=self.hidden_size,
            layer_weights=self._layer_weights,
            chain_chunk=self.vjp_chunk(1, dtype),
            prefix_row_bytes=(self._attention_width + self._kv_width) * torch.empty((), dtype=dtype).element_size(),
            layers=self.num_layers,
        )

    def memory_estimate(
        self, n_tokens: int, options: ExplainOptions, plan: ExplanationPlan, *, steps: int = 1
    ) -> jac.MemoryEstimate:
        """What an explanation of ``n_tokens`` tokens with ``options`` needs at most (jacobian.explanation_memory):
        which graphs, batches and Jacobians these options keep alive with the paths that will run (``method`` for
        the spectra, ``layer_method`` for the layer maps, from the ``plan``), in the order explain_output and
        analyze_layers hold them:

        - always the twin's forward graph, and the double-backward graph that gives the explained token's
          attribution and the reconstruction's JVP (one backward with ``create_graph``);
        - the spectra on the last position's own graph: its cache copy and batches of ``chain_chunk`` rows (FULL)
          or of one Krylov block (MATRIX_FREE), each row reaching the values of the whole prefix;
        - the spectra on the whole graph: FULL batches of ``vjp_chunk`` and the Jacobians, or MATRIX_FREE batches
          of a Krylov block on the kept double-backward graph;
        - the ordinary contrast, a second (undetached) twin graph and the full Jacobian;
        - the layer analysis: one cotangent per block, and a layer map's Jacobians (FULL) or its double-backward
          graph (MATRIX_FREE).

        ``steps``: the explained steps of one generation, whose longest prefix is ``n_tokens``. Read off one shared
        pass (:mod:`linlens.engine.sequence`) they keep that prefix's forward graph and double-backward graph, as its
        own explanation would, and release both before the steps' spectra (which hold one position graph at a time);
        what differs is the attributions' batch (one cotangent per step and target, up to the VJP chunk) and, with
        a last-position spectrum, the steps' batched position graph (engine/step_spectra.py): its batches and every
        step's padded prefix of keys and values."""
        method, layer_method, krylov_batch = plan.method, plan.layer_method, plan.krylov_block
        dtype = DTYPES[options.precision]
        chunk = options.vjp_chunk_size or self.vjp_chunk(n_tokens, dtype)
        graphs, double_backward, jacobians = 1, 1, 0
        batch = 1 + len(options.targets)  # the attributions: one cotangent per target
        if steps > 1:  # a shared pass's attributions: one per step and target, in chunks (engine/sequence.py)
            batch = max(batch, min(chunk, steps * batch))
        position_rows: int | None = None
        if method is not None and plan.on_position_graph:
            position_rows = plan.chain_chunk if method is ExplainMethod.FULL else min(plan.chain_chunk, krylov_batch)
        elif method is ExplainMethod.FULL:
            batch = max(batch, chunk)
            jacobians = 2  # J as computed and its per-position copy
            if options.positions is PositionSelection.ALL or options.prompt_spectrum:
                jacobians += 1  # the SVD's input
            if options.include_jacobians:
                jacobians += 2  # the returned array and its wire encoding
        elif method is ExplainMethod.MATRIX_FREE:
            batch = max(batch, min(chunk, krylov_batch))
        # A matrix-free solve keeps (MAX_ITERATIONS + 1) blocks of rows of each map's input size: d for a position's
        # J_i (or a layer map), tokens x d for the whole-prompt map.
        krylov_rows = 0
        if method is ExplainMethod.MATRIX_FREE:
            d = self.hidden_size
            block = chain_block(options.top_k) if plan.on_position_graph else block_size(max(options.top_k, 1))
            inputs = len(options.selected_positions(n_tokens)) * d + (n_tokens * d if options.prompt_spectrum else 0)
            krylov_rows = (MAX_ITERATIONS + 1) * block * inputs
        if options.layers is not None and layer_method is ExplainMethod.MATRIX_FREE:
            # up-to-layer, layer-alone and the two blocks of one layer at a time
            layer_rows = (MAX_ITERATIONS + 1) * block_size(max(options.layers.top_k, 1)) * 4 * self.hidden_size
            krylov_rows = max(krylov_rows, layer_rows)
        if options.ordinary_contrast:
            graphs += 2  # the ordinary twin keeps its softmax's graph too: counted as two
            batch = max(batch, chunk)
            jacobians += 1
        if options.layers is not None:
            batch = max(batch, 2 * self.num_layers)  # the layers x tokens matrix: one cotangent per block
            if options.layers.needs_jacobians and layer_method is ExplainMethod.FULL:
                batch = max(batch, chunk)
                jacobians += 2  # a layer's map of the embeddings and of its own input
            elif options.layers.needs_jacobians:
                double_backward += 1  # a layer map's double-backward graph
                batch = max(batch, min(chunk, krylov_batch))
        padded = 0
        if steps > 1 and plan.on_position_graph and method is not None:
            # The steps' spectra run on one batched position graph (engine/step_spectra.py): one row per step, each
            # carrying a Krylov block (or a chunk of FULL rows), and every step's prefix of keys and values, padded
            # to the longest (at most hidden wide).
            batch = max(batch, min(chunk, krylov_batch) if method is ExplainMethod.MATRIX_FREE else chunk)
            padded = steps * self.num_layers * 2 * n_tokens * self.hidden_size * torch.empty((), dtype=dtype).itemsize
        geometry = jac.Geometry(
            **self._geometry(n_tokens, dtype),
            attention_width=self._attention_width,
            kv_width=self._kv_width,
            vocab=self.vocab_size,
        )
        estimate = jac.explanation_memory(
            geometry,
            graphs=graphs,
            batch_vjps=batch,
            jacobians=jacobians,
            double_backward=double_backward,
            position_rows=position_rows,
            krylov_rows=krylov_rows,
        )
        return dataclasses.replace(estimate, position=estimate.position + padded) if padded else estimate


__all__ = ["DTYPES", "ModelContext", "Prediction"]
