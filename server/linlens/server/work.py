"""The model work of each request: what runs on a scheduler worker (or, in-process, on the caller's thread).

Both functions take admitted work (:mod:`linlens.server.admission`) and return the contract's results, so the gRPC
service and :class:`~linlens.server.inprocess.InProcessClient` run exactly the same code. ``emit`` receives each
stream event as soon as it exists: every generated token, each explanation (without its layer analysis), then that
step's layers x tokens matrix and each layer's result. ``should_stop`` is polled between tokens, between batches of
VJPs and between layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from linlens.contract import (
    ConceptVector,
    ExplainResult,
    Explanation,
    ExplanationProgress,
    GeneratedToken,
    Generation,
    SteeringPositions,
    StreamEvent,
    Timings,
    Usage,
)
from linlens.engine import ExplanationEvent
from linlens.engine.steering import compute_concept, steered
from linlens.server.admission import ConceptWork, ExplainWork, GenerationWork
from linlens.server.batching import DecodeBatch
from linlens.server.generation import RunControls, generate, generate_batched
from linlens.server.metrics import Metrics
from linlens.server.scheduler import StopReason

Emit = Callable[[StreamEvent], None]
ShouldStop = Callable[[], bool]
OnProgress = Callable[[ExplanationProgress], None]

#: Seconds between two progress events of one phase (its last event always goes out).
PROGRESS_INTERVAL = 0.2


def _never() -> bool:
    return False


def explanation_at_step(explanation: Explanation, step: int) -> Explanation:
    """The explanation of generation step ``step``, its layer analysis included."""
    matrix = explanation.layer_attributions
    return dataclasses.replace(
        explanation,
        step=step,
        layer_attributions=dataclasses.replace(matrix, step=step) if matrix is not None else None,
        layers=tuple(dataclasses.replace(r, step=step) for r in explanation.layers),
    )


def at_step(event: ExplanationEvent, step: int) -> ExplanationEvent:
    """An explanation event of generation step ``step``."""
    if isinstance(event, Explanation):
        return explanation_at_step(event, step)
    return dataclasses.replace(event, step=step)


def progress_reporter(on_progress: OnProgress | None, step: int) -> Callable[[str, int, int], None] | None:
    """The engine's (phase, done, total) callback as ExplanationProgress events of ``step``, a few per second."""
    if on_progress is None:
        return None
    report = on_progress
    last_at, last_phase = 0.0, ""

    def forward(phase: str, done: int, total: int) -> None:
        nonlocal last_at, last_phase
        now = time.monotonic()
        if done >= total or phase != last_phase or now - last_at >= PROGRESS_INTERVAL:
            last_at, last_phase = now, phase
            report(ExplanationProgress(phase=phase, done=done, total=total, step=step))

    return forward


def observe_explanation(metrics: Metrics | None, model: str, explanation: Explanation) -> None:
    """Record an explanation's phase durations and its reconstruction error."""
    if metrics is None:
        return
    for phase, ms in explanation.timings.phases_ms().items():
        metrics.observe_explanation_phase(model, phase, ms / 1000.0)
    if explanation.reconstruction is not None:
        metrics.observe_reconstruction_error(model, explanation.reconstruction.relative_error_vs_model)


def run_explain(
    work: ExplainWork,
    *,
    should_stop: ShouldStop = _never,
    metrics: Metrics | None = None,
    on_progress: OnProgress | None = None,
) -> ExplainResult:
    """Explain the prediction after the prompt (its layer analysis included when asked)."""
    loaded = work.loaded
    explanation = loaded.explainer.explain(
        work.prompt_ids, work.options, should_stop=should_stop, on_progress=progress_reporter(on_progress, 0)
    )
    observe_explanation(metrics, loaded.name, explanation)
    return ExplainResult(
        model=loaded.name, prompt_text=loaded.tokenizer.decode(work.prompt_ids), explanation=explanation
    )


def run_concept(work: ConceptWork, *, should_stop: ShouldStop = _never) -> ConceptVector:
    """Compute a concept vector (one explanation of the concept prompt)."""
    return compute_concept(
        work.loaded.explainer,
        work.prompt_ids,
        work.spec,
        layer=work.layer,
        model_name=work.loaded.name,
        tokens_per_vector=work.tokens_per_vector,
        options=work.options,
        should_stop=should_stop,
    )


@dataclass(frozen=True)
class ResolvedSteering:
    """A request's steering with its concept vector computed. Requests share a decode batch only when their
    ``key`` is equal: the batch's forward passes all run steered by that one steering (docs/operations.md)."""

    model: Any
    vector: npt.NDArray[np.float32]
    layer: int
    strength: float
    positions: SteeringPositions

    @property
    def key(self) -> tuple[int, float, str, bytes]:
        return (self.layer, self.strength, self.positions.value, self.vector.tobytes())

    def around(self, prompt_length: int) -> AbstractContextManager[None]:
        """This steering on the forward passes the calling thread runs inside the block."""
        return steered(
            self.model,
            self.vector,
            layer=self.layer,
            strength=self.strength,
            positions=self.positions,
            prompt_length=prompt_length,
        )


#: The decode batch a generation joins, given its steering (None: unsteered); None runs it apart.
BatchFor = Callable[[ResolvedSteering | None], DecodeBatch | None]


def resolve_steering(work: GenerationWork, should_stop: ShouldStop) -> ResolvedSteering | None:
    """The request's steering, its concept vector computed first (one explanation), or None."""
    plan = work.steering
    if plan is None:
        return None
    vector = plan.steering.vector
    if plan.concept is not None:
        vector = run_concept(plan.concept, should_stop=should_stop).vector
    assert vector is not None
    return ResolvedSteering(
        model=work.loaded.model,
        vector=np.array(vector, dtype=np.float32).reshape(-1),
        layer=plan.layer,
        strength=float(plan.steering.strength),
        positions=SteeringPositions(plan.steering.positions),
    )


def run_generation(
    work: GenerationWork,
    *,
    arrived: float,
    should_stop: ShouldStop = _never,
    stop_reason: Callable[[], StopReason | None] = lambda: None,
    metrics: Metrics | None = None,
    emit: Emit | None = None,
    on_progress: OnProgress | None = None,
    batch_for: BatchFor | None = None,
) -> Generation:
    """Generate, then explain the selected steps. ``arrived`` is the request's arrival (time.monotonic()), from which
    the time to the first token is measured. With ``batch_for`` the generation decodes in the batch it names for the
    request's steering, together with the model's other requests of the same steering (or of none)."""
    loaded = work.loaded
    first_token_seen = False

    def on_token(token: GeneratedToken) -> None:
        nonlocal first_token_seen
        if not first_token_seen and metrics is not None:
            metrics.observe_time_to_first_token(loaded.name, time.monotonic() - arrived)
        first_token_seen = True
        if emit is not None:
            emit(token)

    controls = RunControls(
        max_positions=loaded.max_positions or None, should_stop=should_stop, stop_reason=stop_reason, on_token=on_token
    )
    args = (loaded.model, loaded.tokenizer, work.prompt_ids, work.sampling)
    steering = resolve_steering(work, should_stop)
    batch = batch_for(steering) if batch_for is not None else None
    if batch is not None:
        run = generate_batched(batch, *args, **controls)
    else:
        with steering.around(len(work.prompt_ids)) if steering is not None else contextlib.nullcontext():
            run = generate(*args, **controls)
    if metrics is not None:
        metrics.add_generated_tokens(loaded.name, len(run.tokens))
    explanations: list[Explanation] = []
    timings = Timings(generation_ms=run.seconds * 1000.0)
    steps = work.steps_for(len(run.tokens))
    if steps:
        assert work.explain is not None  # steps_for is empty without it
        # One pass over the longest prefix serves every step (engine/sequence.py): step s explains the generated
        # token s after the prompt and the tokens before it.
        ids = work.prompt_ids + [t.token_id for t in run.tokens[: max(steps) + 1]]

        def forward(index: int, event: ExplanationEvent) -> None:
            if emit is not None:
                emit(at_step(event, steps[index]))

        explained = loaded.explainer.explain_steps(
            ids,
            [len(work.prompt_ids) + step for step in steps],
            work.explain,
            should_stop=should_stop,
            on_progress=lambda index: progress_reporter(on_progress, steps[index]),
            on_event=forward,
        )
        for step, result in zip(steps, explained, strict=True):
            explanation = explanation_at_step(result, step)
            observe_explanation(metrics, loaded.name, explanation)
            explanations.append(explanation)
            timings = timings + dataclasses.replace(explanation.timings, total_ms=0.0)
    return Generation(
        model=loaded.name,
        text=run.text,
        tokens=run.tokens,
        finish_reason=run.finish_reason,
        usage=Usage(
            prompt_tokens=len(work.prompt_ids), completion_tokens=len(run.tokens), explained_steps=len(explanations)
        ),
        explanations=tuple(explanations),
        timings=timings,
        prompt_text=loaded.tokenizer.decode(work.prompt_ids),
        seed=run.seed,
    )


__all__ = [
    "BatchFor",
    "Emit",
    "ResolvedSteering",
    "at_step",
    "explanation_at_step",
    "observe_explanation",
    "resolve_steering",
    "run_concept",
    "run_explain",
    "run_generation",
]
