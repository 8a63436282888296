"""Explained generation: every explained step of one token sequence read off passes run once for all of them.

A generation explained at steps s_1 < ... < s_K explains the token after each prefix ids[:n_k]. Causality makes all
those prefixes share one frozen system: the twin's coefficients at positions < m (norm scales, gates, softmax rows,
routers) do not change when tokens are appended, and neither do the served model's hidden states. So, instead of one
whole explanation per step (the served model's prediction, the twin's forward with grad over the prefix, its
attribution and reconstruction passes), a :class:`SequencePass` runs, over the longest prefix ids[:n_K] only:

- one no-grad forward of the served model: step k's y_model (and logits) is its hidden state at n_k - 1 (none
  where the twin's forward is the served model's own, bit for bit: its hidden states are then read instead);
- one forward of the twin with grad and a key/value cache: step k's y is position n_k - 1's output, and its
  Jacobian with respect to every input embedding is that of the prefix alone (positions >= n_k get exactly zero);
- the attributions of every step and target: batched backwards with one cotangent per (step, target);
- the reconstructions y_k = J_k x + c_k of every step: one differentiable backward g(U) = sum_k J_k^T u_k with a
  dummy U (K, d), then one backward of g . x with respect to U gives every J_k x at once (the double-backward trick
  of :mod:`linlens.engine.products`, for all steps together);
- for models with bias terms, every step's constant c_k from one replay of the frozen system at input zero.

The last position's spectra of all steps come from one batched position graph (:mod:`linlens.engine.step_spectra`):
each step's token at n_k - 1 on the shared cache cropped to its prefix (detached), the K steps as rows of one batch,
so every pass of products serves every step. Each step is then decoded by the whole-output explanation's own code
(:func:`linlens.engine.output_spectra.position_spectra`) through a :class:`StepPass`, a view of the shared pass as one
step's :class:`~linlens.engine.forward.ExplanationPass` (whose own position graph serves the tests as a reference).

What this module does not share (a layer analysis, spectra of other positions or of the whole prompt, raw Jacobians,
the ordinary contrast) runs as it always did, one whole explanation per step: :func:`shares_pass` says which.
Every step's result equals a standalone explanation of its prefix to rounding (tests/test_sequence.py: 1e-12 in
float64 on every family, 1e-5 in float32 on SmolLM2).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from linlens.contract import (
    AttributionTarget,
    ExplainMethod,
    ExplainOptions,
    Explanation,
    PositionSpectrum,
)
from linlens.engine import jacobian as jac
from linlens.engine.context import DTYPES, ModelContext, Prediction
from linlens.engine.explanation import assemble, attribution, reconstructed
from linlens.engine.forward import ExplanationPass
from linlens.engine.freeze import CoefficientTape, recording, replaying
from linlens.engine.last_position import LastPositionSpectrum
from linlens.engine.output_spectra import Tally, position_spectra
from linlens.engine.plan import plan
from linlens.engine.position_graph import PositionGraph, build_position_graph, detached_prefix
from linlens.engine.step_spectra import build_batched_position_graph, step_spectra

#: The (phase, done, total) progress callback of the step at an index of the lengths, or None.
StepProgress = Callable[[int], jac.OnPhaseProgress | None]


def shares_pass(context: ModelContext, options: ExplainOptions, lengths: Sequence[int]) -> bool:
    """Whether every step (prefix lengths ``lengths``) can be read off one :class:`SequencePass`: its spectra, if
    any, are the last position's alone (on the position graph), with no layer analysis and no ordinary contrast."""
    if options.layers is not None or options.ordinary_contrast or not lengths:
        return False
    shape = context.shape(DTYPES[options.precision])
    plans = [plan(options, n, shape) for n in lengths]
    return all(p.method is None or p.on_position_graph for p in plans) and len({p.method for p in plans}) == 1


@dataclass(frozen=True)
class _Shared:
    """What the shared phases computed for one step."""

    prediction: Prediction
    #: The twin's y at the step's last position, detached.
    y: torch.Tensor
    #: J x (d,) and the affine constant c (d,).
    linear: torch.Tensor
    constant: torch.Tensor
    #: Per target: (per-token shares over the prefix (n,), the target).
    rows: list[tuple[torch.Tensor, AttributionTarget]]


class SequencePass:
    """The passes shared by the explained steps of one token sequence; see the module docstring.

    ``ids`` holds at least every prefix and its explained token: step k explains ``ids[lengths[k]]`` after
    ``ids[:lengths[k]]`` (the caller's ``options.explained_token_id`` is ignored). ``lengths`` must increase.
    """

    def __init__(
        self,
        context: ModelContext,
        ids: Sequence[int],
        lengths: Sequence[int],
        options: ExplainOptions,
        *,
        should_stop: jac.ShouldStop | None = None,
    ) -> None:
        started = time.perf_counter()
        if list(lengths) != sorted(set(lengths)) or not lengths or lengths[0] < 1 or lengths[-1] >= len(ids):
            raise ValueError(f"prefix lengths {list(lengths)} must increase, within 1..{len(ids) - 1}")
        self.context = context
        self.options = options
        self.ids = tuple(int(t) for t in ids)
        self.lengths = tuple(int(n) for n in lengths)
        self.n = self.lengths[-1]
        self.dtype = DTYPES[options.precision]
        last = torch.tensor([n - 1 for n in self.lengths], device=context.device)
        self.twin = context.twin(options.precision, options.gate_mode)
        #: Whether the twin's forward is the served model's own, bit for bit (ModelContext.twin_is_served): then
        #: every step's prediction is read off it, as ExplanationPass does, and the served model is not run again.
        self.served_by_twin = context.twin_is_served(options.precision, options.gate_mode)
        # The served model's own answers at every step's last position, from one forward.
        hidden = None if self.served_by_twin else context.hidden_states(self.ids[: self.n])
        base = context.base(self.dtype)
        self.head: torch.Tensor = context.logit_head(base.get_output_embeddings().weight)
        ids_tensor = torch.tensor(self.ids[: self.n], dtype=torch.long, device=context.device)
        #: The input embeddings of the longest prefix (n, d), the leaf of every step's Jacobian.
        self.x: torch.Tensor = base.get_input_embeddings()(ids_tensor).detach().requires_grad_(True)
        self.tape = CoefficientTape()
        cache = DynamicCache()
        with recording(self.tape), torch.enable_grad():
            out = self.twin.base_model(inputs_embeds=self.x[None], use_cache=True, cache=cache)
        #: Every step's y, (K, d), on the twin's graph.
        ys = out.last_hidden_state[0, last]
        if hidden is None:
            hidden = out.last_hidden_state[0].detach()
        self.predictions = [context.prediction(hidden[n - 1], self.ids[n]) for n in self.lengths]
        del hidden
        #: The keys and values of every position, detached: each step's position graph crops its own prefix.
        self.cache = detached_prefix(cache, self.n)
        del cache, out
        self.ys = ys.detach()
        constants = torch.zeros_like(self.ys)
        if context.has_bias:
            with replaying(self.tape), torch.no_grad():
                zero = self.twin.base_model(inputs_embeds=torch.zeros_like(self.x)[None], use_cache=False)
            constants = zero.last_hidden_state[0, last]
        self.constants = constants
        self.forward_seconds = time.perf_counter() - started

        tick = time.perf_counter()
        self.attribution_rows = self._attributions(ys, should_stop)
        self.attribution_seconds = time.perf_counter() - tick
        tick = time.perf_counter()
        self.linear = self._linear(ys)  # every step's J x; the twin's graph is released with ``ys``
        del ys
        self.reconstruction_seconds = time.perf_counter() - tick

    def targets(self, index: int) -> tuple[AttributionTarget, ...]:
        """Step ``index``'s attribution targets: its explained token, then the options' targets."""
        return (AttributionTarget(self.predictions[index].explained.token_id), *self.options.attribution_targets)

    def _attributions(self, ys: torch.Tensor, should_stop: jac.ShouldStop | None) -> torch.Tensor:
        """Per-token shares (K, T, n) of every step's targets: batched backwards, one cotangent per (step, target),
        in chunks that keep a batch within the VJP memory budget."""
        k_steps, d = ys.shape
        directions = torch.stack(
            [
                torch.stack(
                    [
                        self.head[t.token_id]
                        - (self.head[t.contrast_token_id] if t.contrast_token_id is not None else 0)
                        for t in self.targets(k)
                    ]
                )
                for k in range(k_steps)
            ]
        )  # (K, T, d)
        count = directions.shape[1]
        cotangents = ys.new_zeros((k_steps, count, k_steps, d))
        cotangents[torch.arange(k_steps), :, torch.arange(k_steps)] = directions.to(ys.dtype)
        cotangents = cotangents.reshape(k_steps * count, k_steps, d)
        chunk = self.options.vjp_chunk_size or self.context.vjp_chunk(self.n, self.dtype)
        x = self.x.detach()
        parts = []
        for start in range(0, cotangents.shape[0], chunk):
            if should_stop is not None and should_stop():
                raise jac.ExplanationCancelled("explanation cancelled while attributing")
            block = cotangents[start : start + chunk]
            with torch.enable_grad():
                (rows,) = torch.autograd.grad(ys, self.x, grad_outputs=block, is_grads_batched=True, retain_graph=True)
            parts.append((rows * x[None]).sum(dim=-1))
        return torch.cat(parts).reshape(k_steps, count, self.n)

    def _linear(self, ys: torch.Tensor) -> torch.Tensor:
        """J_k x for every step (K, d): one differentiable backward g(U) = sum_k J_k^T u_k, then the gradient of
        g . x with respect to U (it is linear in U, so U's value does not matter)."""
        dummy = torch.zeros_like(ys.detach()).requires_grad_(True)
        with torch.enable_grad():
            (transposed,) = torch.autograd.grad(ys, self.x, grad_outputs=dummy, create_graph=True)
            (linear,) = torch.autograd.grad(transposed, dummy, grad_outputs=self.x.detach())
        return linear.detach()

    def step(self, index: int) -> StepPass:
        """Step ``index`` as an explanation pass of its own prefix (a view: it runs no forward)."""
        return StepPass(self, index)

    def result(self, index: int) -> _Shared:
        """What the shared phases computed for step ``index``."""
        n = self.lengths[index]
        rows = [(self.attribution_rows[index, t, :n], target) for t, target in enumerate(self.targets(index))]
        return _Shared(self.predictions[index], self.ys[index], self.linear[index], self.constants[index], rows)


class StepPass(ExplanationPass):
    """One step of a :class:`SequencePass` as the :class:`ExplanationPass` of its prefix, for the code that reads
    the last position's spectrum off a pass. It runs no forward of its own (it deliberately does not call
    ``ExplanationPass.__init__``): its y is the shared pass's, its position graph runs on the shared cache cropped
    to its prefix. It keeps no graph over the prefix, so it serves no whole-graph product, layer analysis or replay
    (:func:`shares_pass` sends those requests elsewhere)."""

    def __init__(self, shared: SequencePass, index: int) -> None:
        n = shared.lengths[index]
        self.context = shared.context
        self.options = shared.options
        self.decoder = shared.context.decoder.for_request(shared.options)
        self.input_ids = shared.ids[:n]
        self.ids = torch.tensor(self.input_ids, dtype=torch.long, device=shared.context.device)
        self.n = n
        self.dtype = shared.dtype
        self.plan = plan(shared.options, n, shared.context.shape(shared.dtype))
        self.prediction = shared.predictions[index]
        self.twin = shared.twin
        self.head = shared.head
        self.x = shared.x.detach()[:n]
        self.analyses_layers = False
        self.tape = shared.tape
        self.y = shared.ys[index]
        self.prefix = [(k[..., : n - 1, :], v[..., : n - 1, :]) for k, v in shared.cache]
        self._position: PositionGraph | None = None
        self.constant = shared.constants[index]
        self.block_constants: dict[tuple[str, int], torch.Tensor] = {}
        self.seconds = 0.0

    def position_graph(self) -> PositionGraph:
        """The step's last position alone on the shared cache cropped to its prefix."""
        if self._position is None:
            self._position = build_position_graph(self.twin, self.x[-1], self.prefix, record_layers=False)
        return self._position


@dataclass(frozen=True)
class StepSpectra:
    """Every step's last-position spectrum (:mod:`linlens.engine.step_spectra`) and what the phase took."""

    found: list[LastPositionSpectrum]
    #: Seconds building the batched position graph, and computing the spectra (SVDs included).
    graph_seconds: float
    seconds: float


def shared_spectra(
    shared: SequencePass, *, should_stop: jac.ShouldStop | None = None, on_progress: jac.OnPhaseProgress | None = None
) -> StepSpectra | None:
    """Every step's last-position spectrum, from one batched position graph (None: no spectrum asked for)."""
    step = shared.step(0)
    method = step.plan.method
    if method is None:
        return None
    prefixes = [n - 1 for n in shared.lengths]
    xs = shared.x.detach()[torch.tensor(prefixes, device=shared.x.device)]
    graph = build_batched_position_graph(shared.twin, xs, shared.cache, prefixes)
    started = time.perf_counter()
    chunk = shared.options.vjp_chunk_size or shared.context.vjp_chunk(len(prefixes), shared.dtype)
    found = step_spectra(
        graph, shared.ys, shared.options.top_k, method, chunk=chunk, should_stop=should_stop, on_progress=on_progress
    )
    return StepSpectra(found, graph.seconds, time.perf_counter() - started)


def explain_step(shared: SequencePass, index: int, spectra: StepSpectra | None) -> Explanation:
    """Step ``index``'s explanation: its attributions and reconstruction from the shared phases, its last-position
    spectrum from ``spectra`` (:func:`shared_spectra`; None only when no spectrum is asked for). The shared phases'
    time is split evenly over the steps."""
    context = shared.context
    parts = shared.result(index)
    prediction, y = parts.prediction, parts.y
    y_model = prediction.y_model
    count = len(shared.lengths)
    tally = Tally(
        timings={
            "forward_ms": shared.forward_seconds * 1000.0 / count,
            "attribution_ms": shared.attribution_seconds * 1000.0 / count,
            "reconstruction_ms": shared.reconstruction_seconds * 1000.0 / count,
        }
    )
    attributions = [
        attribution(
            context.decoder,
            target,
            shared.head[target.token_id]
            - (shared.head[target.contrast_token_id] if target.contrast_token_id is not None else 0),
            row,
            y_model,
            parts.constant,
        )
        for row, target in parts.rows
    ]
    tally.vjps += len(parts.rows)
    y_linear = parts.linear + parts.constant
    tally.jvps += 1
    reconstruction = reconstructed(y_linear, y, prediction, shared.head)
    step = shared.step(index)
    method = step.plan.method
    results: tuple[PositionSpectrum, ...] = ()
    if method is not None:
        if spectra is None:
            raise ValueError("the options ask for a spectrum: compute every step's with shared_spectra first")
        found = spectra.found[index]
        svd_total = sum(f.svd_seconds for f in spectra.found)
        phase = "svd" if method is ExplainMethod.MATRIX_FREE else "jacobian"
        tally.timings["forward_ms"] += spectra.graph_seconds * 1000.0 / count
        tally.timings[f"{phase}_ms"] = (spectra.seconds - svd_total) * 1000.0 / count
        tally.timings["svd_ms"] = tally.timings.get("svd_ms", 0.0) + found.svd_seconds * 1000.0
        tally.vjps += found.vjps
        tally.jvps += found.jvps
        errors = None if found.complete else [found.stable_rank_error]
        results = position_spectra(
            step, [step.n - 1], [found.spectrum], [found.residuals], tally, complete=found.complete, errors=errors
        )
    return assemble(step, reconstruction, attributions, results, tally)


def explain_steps(
    context: ModelContext,
    ids: Sequence[int],
    lengths: Sequence[int],
    options: ExplainOptions,
    *,
    should_stop: jac.ShouldStop | None = None,
    on_progress: StepProgress | None = None,
) -> Iterator[Explanation]:
    """Every step's explanation in order, each as soon as it is ready (the shared phases run before the first);
    ``should_stop`` is polled between steps and inside each, ``on_progress(index)`` gives a step's progress."""
    shared = SequencePass(context, ids, lengths, options, should_stop=should_stop)
    # The spectra of every step at once, reported as the first step's progress.
    spectra = shared_spectra(
        shared, should_stop=should_stop, on_progress=on_progress(0) if on_progress is not None else None
    )
    for index in range(len(shared.lengths)):
        if should_stop is not None and should_stop():
            raise jac.ExplanationCancelled("the explained generation was stopped")
        yield explain_step(shared, index, spectra)


__all__ = ["SequencePass", "StepPass", "StepProgress", "explain_step", "explain_steps", "shares_pass"]
