"""The linlens.v1.LinlensService servicer: the RPCs and nothing else.

Each RPC reads as its request path (docs/architecture.md draws it):

1. admission on the gRPC thread (:mod:`linlens.server.admission`): the model (NOT_FOUND, UNAVAILABLE while it loads),
   the input and the options (INVALID_ARGUMENT), all before any work is queued;
2. the model work (:mod:`linlens.server.work`) on the scheduler, tied to the call's deadline and cancellation
   (:mod:`linlens.server.jobs`; RESOURCE_EXHAUSTED when the queue is full);
3. the contract's results mapped to protobuf (:mod:`linlens.contract.wire`).

What every call gets besides (request id, admission during a drain, the status of a failure, metrics, the access
log) is the interceptor's (:mod:`linlens.server.calls`); the servicer only notes what it learns on the call's record.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import TypeVar

import grpc

from linlens.contract import ExplainResult, ExplanationProgress, Generation, StreamEvent, Timings
from linlens.contract.wire import (
    concept_vector_to_proto,
    explain_result_to_proto,
    generation_to_proto,
    model_info_to_proto,
    progress_to_proto,
    stream_event_to_proto,
)
from linlens.models import LoadedModel
from linlens.server.admission import (
    ExplainWork,
    GenerationWork,
    prepare_concept,
    prepare_explain,
    prepare_generation,
)
from linlens.server.batching import DecodeBatch
from linlens.server.calls import CallRecord, current_call
from linlens.server.config import ServerConfig
from linlens.server.hosting import ModelHost
from linlens.server.jobs import JobRunner
from linlens.server.metrics import Metrics
from linlens.server.scheduler import CancelToken
from linlens.server.work import BatchFor, Emit, ResolvedSteering, run_concept, run_explain, run_generation
from linlens.v1 import linlens_pb2 as pb
from linlens.v1 import linlens_pb2_grpc as pb_grpc

R = TypeVar("R")
M = TypeVar("M")


class LinlensServicer(pb_grpc.LinlensServiceServicer):
    """Implements linlens.v1.LinlensService on top of a ModelHost and a JobRunner."""

    def __init__(
        self,
        config: ServerConfig,
        host: ModelHost,
        jobs: JobRunner,
        metrics: Metrics,
        generation_jobs: JobRunner | None = None,
    ) -> None:
        self.config = config
        self.host = host
        self.jobs = jobs
        self.metrics = metrics
        #: The generation lane: plain generations (no explanation, no concept to compute) wait here, not behind
        #: explanations, and decode together in their model's batch. Without it, every generation runs on ``jobs``.
        self.generation_jobs = generation_jobs
        #: The decode batches, one per model and steering (None: unsteered); a steered one is forgotten when idle.
        self._batches: dict[tuple[str, tuple[int, float, str, bytes] | None], DecodeBatch] = {}
        self._batches_lock = threading.Lock()

    def close_batches(self, timeout: float) -> bool:
        """End every decode thread (the drain, once no generation is left); True when all ended in time."""
        with self._batches_lock:
            batches = list(self._batches.values())
        end = time.monotonic() + timeout
        return all([batch.close(max(0.0, end - time.monotonic())) for batch in batches])

    def _batch_for(self, loaded: LoadedModel) -> BatchFor:
        """How a generation of ``loaded`` finds its decode batch once its steering is known."""
        return lambda steering: self._batch(loaded, steering)

    def _batch(self, loaded: LoadedModel, steering: ResolvedSteering | None = None) -> DecodeBatch | None:
        """The decode batch of ``loaded`` and ``steering`` (made on first use), or None when batching is off."""
        if self.config.max_batch_size <= 1:
            return None
        key = (loaded.name, steering.key if steering is not None else None)
        with self._batches_lock:
            batch = self._batches.get(key)
            if batch is None or batch.model is not loaded.model:
                for old in [k for k, b in self._batches.items() if k[1] is not None and b.idle]:
                    del self._batches[old]  # steerings come and go: keep only the batches in use
                name = loaded.name
                batch = DecodeBatch(
                    loaded.model,
                    max_batch_size=self.config.max_batch_size,
                    max_batch_tokens=self.config.max_batch_tokens,
                    on_step=lambda size: self.metrics.observe_batch_size(name, size),
                    on_join=lambda wait: self.metrics.observe_batch_join_wait(name, wait),
                    steer=steering.around if steering is not None else None,
                )
                self._batches[key] = batch
            return batch

    def _lane(self, work: GenerationWork) -> JobRunner:
        """Where a generation runs: the generation lane when it is plain (no explanation; steered by a given vector
        or not at all), else with the explanations (a concept to compute is an explanation)."""
        steering = work.steering
        plain = work.explain is None and (steering is None or steering.concept is None)
        if self.generation_jobs is not None and plain:
            return self.generation_jobs
        return self.jobs

    def Explain(self, request: pb.ExplainRequest, context: grpc.ServicerContext) -> pb.ExplainResponse:
        call = self._for_model(request.model)
        work = self._admit_explain(request, call)
        result = self.jobs.run(
            context, lambda token: run_explain(work, should_stop=token.should_stop, metrics=self.metrics)
        )
        return explain_result_to_proto(self._explained(call, result))

    def ExplainStream(
        self, request: pb.ExplainStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExplainStreamResponse]:
        call = self._for_model(request.model)
        work = self._admit_explain(request, call)
        events = self.jobs.stream(
            context,
            lambda token, emit: run_explain(
                work, should_stop=token.should_stop, metrics=self.metrics, on_progress=emit
            ),
        )
        result: ExplainResult = yield from _relay(events, _progress_message)
        yield pb.ExplainStreamResponse(result=explain_result_to_proto(self._explained(call, result)))

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        call = self._for_model(request.model)
        work = self._admit_generation(request, call)
        generation = self._lane(work).run(context, lambda token: self._generate(work, call, token))
        return generation_to_proto(self._finished(call, generation))

    def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateStreamResponse]:
        call = self._for_model(request.model)
        work = self._admit_generation(request, call)
        events = self._lane(work).stream(context, lambda token, emit: self._generate(work, call, token, emit))
        generation: Generation = yield from _relay(events, stream_event_to_proto)
        yield stream_event_to_proto(self._finished(call, generation).done())

    def ComputeConcept(
        self, request: pb.ComputeConceptRequest, context: grpc.ServicerContext
    ) -> pb.ComputeConceptResponse:
        call = self._for_model(request.model)
        work = prepare_concept(request, self.host, self.config)
        self._note_input(call, work.loaded, work.prompt_ids)
        concept = self.jobs.run(context, lambda token: run_concept(work, should_stop=token.should_stop))
        self.metrics.observe_queue_wait(call.model, call.queue_s)
        return concept_vector_to_proto(concept)

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[model_info_to_proto(self.host.info(slot)) for slot in self.host.slots.values()],
            default_model=self.host.default_name,
        )

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.GetModelResponse:
        slot = self.host.resolve(request.name)
        current_call().model = slot.name
        return pb.GetModelResponse(model=model_info_to_proto(self.host.info(slot)))

    # -- what the RPCs share ------------------------------------------------------------------------------------

    def _for_model(self, name: str) -> CallRecord:
        """The call's record, naming the model the request resolves to (NOT_FOUND for an unknown one)."""
        call = current_call()
        call.model = self.host.resolve(name).name
        return call

    def _note_input(self, call: CallRecord, loaded: LoadedModel, prompt_ids: list[int]) -> None:
        call.prompt_tokens = len(prompt_ids)
        if self.config.log_prompts:
            call.prompt_text = loaded.tokenizer.decode(prompt_ids)

    def _admit_explain(self, request: pb.ExplainRequest | pb.ExplainStreamRequest, call: CallRecord) -> ExplainWork:
        work = prepare_explain(request, self.host, self.config)
        self._note_input(call, work.loaded, work.prompt_ids)
        return work

    def _explained(self, call: CallRecord, result: ExplainResult) -> ExplainResult:
        """Note a finished explanation on the call's record; the result with the request's timings."""
        self.metrics.observe_queue_wait(call.model, call.queue_s)
        explanation = result.explanation
        call.explain_s, call.explained_steps = explanation.timings.total_ms / 1000.0, 1
        timings = dataclasses.replace(explanation.timings, queue_ms=call.queue_s * 1000.0, total_ms=_elapsed_ms(call))
        return dataclasses.replace(result, explanation=dataclasses.replace(explanation, timings=timings))

    def _admit_generation(
        self, request: pb.GenerateRequest | pb.GenerateStreamRequest, call: CallRecord
    ) -> GenerationWork:
        work = prepare_generation(request, self.host, self.config)
        self._note_input(call, work.loaded, work.prompt_ids)
        return work

    def _generate(
        self, work: GenerationWork, call: CallRecord, token: CancelToken, emit: Emit | None = None
    ) -> Generation:
        """Run the generation job on a worker: in the model's decode batch (if any), stopped by ``token``, each
        event sent to ``emit`` when streaming."""
        return run_generation(
            work,
            arrived=call.started,
            should_stop=token.should_stop,
            stop_reason=lambda: token.reason,
            metrics=self.metrics,
            emit=emit,
            on_progress=emit,
            batch_for=self._batch_for(work.loaded),
        )

    def _finished(self, call: CallRecord, generation: Generation) -> Generation:
        """Note a finished generation on the call's record; the Generation with the request's timings."""
        self.metrics.observe_queue_wait(call.model, call.queue_s)
        call.generation_s = generation.timings.generation_ms / 1000.0
        call.explain_s = sum(e.timings.total_ms for e in generation.explanations) / 1000.0
        call.completion_tokens = generation.usage.completion_tokens
        call.explained_steps = generation.usage.explained_steps
        timings: Timings = dataclasses.replace(
            generation.timings, queue_ms=call.queue_s * 1000.0, total_ms=_elapsed_ms(call)
        )
        return dataclasses.replace(generation, timings=timings)


def _elapsed_ms(call: CallRecord) -> float:
    return (time.monotonic() - call.started) * 1000.0


def _relay(events: Generator[StreamEvent, None, R], encode: Callable[[StreamEvent], M | None]) -> Generator[M, None, R]:
    """Yield a job's events as messages (``encode`` returns None for an event the RPC does not send), then return
    what the job returned."""
    while True:
        try:
            event = next(events)
        except StopIteration as finished:
            result: R = finished.value
            return result
        message = encode(event)
        if message is not None:
            yield message


def _progress_message(event: StreamEvent) -> pb.ExplainStreamResponse | None:
    """ExplainStream sends the progress events only (the explanation comes once, with the result)."""
    if isinstance(event, ExplanationProgress):
        return pb.ExplainStreamResponse(progress=progress_to_proto(event))
    return None


__all__ = ["LinlensServicer"]
