"""Admission: from a request message to validated work (the input as token ids, the sampling, the options).

It runs on the gRPC thread before anything is queued, so a bad request fails at once, with INVALID_ARGUMENT naming
the field, without taking a queue slot. It applies three kinds of rules, each from its one home:

- the options' own rules (``top_k >= 0``, ``every`` xor ``layers``): the contract's dataclasses, while decoding;
- the model's (a token id inside the vocabulary, a layer that exists): ``Explainer.validate``;
- this server's limits (``max_top_k``, ``max_explained_steps``, ...): here, from :class:`ServerConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import grpc

from linlens.contract import ConceptSpec, ExplainMethod, ExplainOptions, OptionError, Steering
from linlens.contract.wire import concept_spec_from_proto, explain_options_from_proto, steering_from_proto
from linlens.engine import check_token_id
from linlens.engine.steering import DEFAULT_CONCEPT_TOKENS, concept_options
from linlens.models import LoadedModel
from linlens.server.config import ServerConfig
from linlens.server.generation import DEFAULT_MAX_NEW_TOKENS, Sampling
from linlens.server.hosting import ModelHost
from linlens.server.inputs import InputError, check_token_ids, encode_chat, encode_text
from linlens.server.status import RpcFailure, invalid
from linlens.v1 import linlens_pb2 as pb


@dataclass(frozen=True)
class ExplainWork:
    """An admitted Explain request."""

    loaded: LoadedModel
    prompt_ids: list[int]
    options: ExplainOptions


@dataclass(frozen=True)
class ConceptWork:
    """An admitted concept vector to compute: a ComputeConcept request, or a Steering's concept prompt."""

    loaded: LoadedModel
    prompt_ids: list[int]
    spec: ConceptSpec
    #: The resolved layer of a LAYER map; None for OUTPUT.
    layer: int | None
    #: The explanation that computes it, as admitted (method switched to matrix-free when memory asks for it).
    options: ExplainOptions
    tokens_per_vector: int


@dataclass(frozen=True)
class SteeringWork:
    """An admitted Steering: the steered layer resolved, and the concept to compute (None: the vector is given)."""

    steering: Steering
    layer: int
    concept: ConceptWork | None


@dataclass(frozen=True)
class GenerationWork:
    """An admitted Generate or GenerateStream request."""

    loaded: LoadedModel
    prompt_ids: list[int]
    sampling: Sampling
    #: How to explain each explained step (explained_token_id cleared: a step explains the token it generated).
    explain: ExplainOptions | None
    #: The steps to explain; None means every step the generation makes.
    steps: tuple[int, ...] | None
    #: How to steer the generation; None means no steering.
    steering: SteeringWork | None = None

    def steps_for(self, generated: int) -> list[int]:
        """The explained steps of a generation that made ``generated`` tokens (it may have stopped early)."""
        if self.explain is None:
            return []
        if self.steps is None:
            return list(range(generated))
        return [s for s in self.steps if s < generated]


def encode_input(loaded: LoadedModel, message: pb.Input, config: ServerConfig) -> list[int]:
    """The request's input as token ids, validated against the model and the server's limits."""
    kind = message.WhichOneof("kind")
    try:
        if kind == "text":
            ids = encode_text(loaded.tokenizer, message.text)
        elif kind == "token_ids":
            ids = check_token_ids(list(message.token_ids.ids), loaded.vocab_size)
        elif kind == "chat":
            turns = [(m.role, m.content) for m in message.chat.messages]
            ids = encode_chat(loaded.tokenizer, turns, not message.chat.omit_generation_prompt)
        else:
            raise invalid("input is missing: set exactly one of input.text, input.token_ids or input.chat")
    except (InputError, OptionError) as exc:
        raise invalid(str(exc)) from None
    if config.max_prompt_tokens and len(ids) > config.max_prompt_tokens:
        raise invalid(
            f"the input has {len(ids)} tokens, above this server's limit of {config.max_prompt_tokens} "
            "(max_prompt_tokens); shorten it"
        )
    if loaded.max_positions and len(ids) >= loaded.max_positions:
        raise invalid(
            f"the input has {len(ids)} tokens, which fills the model's context of {loaded.max_positions} "
            "(max_prompt_tokens 0 means the model's context); shorten it"
        )
    return ids


def sampling_from_proto(message: pb.SamplingParams | None, config: ServerConfig) -> Sampling:
    """The request's sampling, validated (absent: greedy decoding with the default length)."""
    default_length = min(DEFAULT_MAX_NEW_TOKENS, config.max_new_tokens)
    if message is None:
        return Sampling(max_new_tokens=default_length)
    sampling = Sampling(
        max_new_tokens=message.max_new_tokens if message.HasField("max_new_tokens") else default_length,
        temperature=message.temperature,
        top_p=1.0 if message.top_p == 0.0 else message.top_p,
        top_k=message.top_k,
        seed=message.seed if message.HasField("seed") else None,
        stop_sequences=tuple(message.stop_sequences),
        ignore_eos=message.ignore_eos,
    )
    try:
        return sampling.validate(config.max_new_tokens)
    except InputError as exc:
        raise invalid(str(exc)) from None


def explain_options(
    message: pb.ExplainOptions,
    field: str,
    loaded: LoadedModel,
    prompt_ids: list[int],
    config: ServerConfig,
    *,
    max_new_tokens: int | None = None,
) -> tuple[ExplainOptions, tuple[int, ...] | None]:
    """Decode and check a request's ExplainOptions (``field`` names it in messages: "options" or "explain").

    Returns the options and, for a generation of at most ``max_new_tokens`` tokens, the steps to explain (None:
    every step). Raises RpcFailure(INVALID_ARGUMENT) naming the field that breaks a rule.
    """
    try:
        options = explain_options_from_proto(message)
        steps = options.explained_steps(max_new_tokens) if max_new_tokens is not None else (0,)
        if max_new_tokens is not None:
            options = dataclasses.replace(options, explained_token_id=None)
        loaded.explainer.validate(prompt_ids, options)
        _check_limits(options, steps, loaded, config, max_new_tokens)
        explained = len(steps) if steps is not None else int(max_new_tokens or 1)
        n_tokens = len(prompt_ids) + _last_step(steps, max_new_tokens)
        options = _fit_memory(options, field, n_tokens, loaded, config, explained)
    except OptionError as error:
        raise invalid(str(error.under(field))) from None
    return options, steps


def _check_limits(
    options: ExplainOptions,
    steps: tuple[int, ...] | None,
    loaded: LoadedModel,
    config: ServerConfig,
    max_new_tokens: int | None,
) -> None:
    """This server's limits on an explanation request (OptionError naming the option and the limit)."""

    def at_most(name: str, value: int, limit: int, setting: str, advice: str) -> None:
        if value > limit:
            raise OptionError(name, f"is {value}, above this server's limit of {limit} ({setting}); {advice}")

    at_most("top_k", options.top_k, config.max_top_k, "max_top_k", "ask for fewer singular components")
    at_most(
        "tokens_per_vector",
        options.tokens_per_vector,
        config.max_tokens_per_vector,
        "max_tokens_per_vector",
        "ask for fewer",
    )
    at_most(
        "targets",
        len(options.targets),
        config.max_attribution_targets,
        "max_attribution_targets",
        "attribute fewer targets per request",
    )
    explained = len(steps) if steps is not None else int(max_new_tokens or 1)
    if steps is None:
        at_most(
            "steps",
            explained,
            config.max_explained_steps,
            "max_explained_steps; EXPLAIN_STEPS_ALL may explain every one of max_new_tokens steps",
            "lower max_new_tokens or list the steps (EXPLAIN_STEPS_LIST)",
        )
    else:
        at_most("step_indices", explained, config.max_explained_steps, "max_explained_steps", "explain fewer steps")
    layers = options.layers
    if layers is None:
        return
    at_most("layers.top_k", layers.top_k, config.max_top_k, "max_top_k", "ask for fewer singular components")
    at_most(
        "layers.tokens_per_vector",
        layers.tokens_per_vector,
        config.max_tokens_per_vector,
        "max_tokens_per_vector",
        "ask for fewer",
    )
    if layers.needs_jacobians:
        analysed = len(layers.selected(loaded.num_layers)) * explained
        at_most(
            "layers",
            analysed,
            config.max_analyzed_layers,
            f"max_analyzed_layers; layers with Jacobians summed over {explained} explained step(s)",
            "select fewer layers (layers or every), explain fewer steps, or turn up_to_layer, layer_alone and "
            "component_spectra off for the cheap attribution matrix only",
        )


def _last_step(steps: tuple[int, ...] | None, max_new_tokens: int | None) -> int:
    """Tokens generated before the last explained step (0 for Explain): what the longest explanation adds."""
    if steps is None:
        return max(0, int(max_new_tokens or 1) - 1)
    return max(steps, default=0)


def _fit_memory(
    options: ExplainOptions, field: str, n_tokens: int, loaded: LoadedModel, config: ServerConfig, steps: int = 1
) -> ExplainOptions:
    """The options to run under ``max_explanation_memory_mb``, by the engine's estimate, before any work starts.

    Under ``method`` AUTO a request whose full Jacobians would not fit runs matrix-free when that fits (the same
    outputs to the certified tolerance, without the Jacobians). Otherwise RpcFailure RESOURCE_EXHAUSTED with the
    estimate and the ways to make it smaller: the same request can never fit this server, so a retry is pointless.
    """
    estimate = loaded.explainer.memory_estimate(n_tokens, options, steps=steps)
    if estimate.total <= config.max_explanation_memory_bytes:
        return options
    if options.method is ExplainMethod.AUTO and not options.include_jacobians:
        free = dataclasses.replace(options, method=ExplainMethod.MATRIX_FREE)
        if loaded.explainer.memory_estimate(n_tokens, free, steps=steps).total <= config.max_explanation_memory_bytes:
            return free
    chunk = f", a smaller {field}.vjp_chunk_size" if options.vjp_chunk_size else ""
    raise RpcFailure(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{field}: an explanation of {n_tokens} tokens with these options needs {estimate.describe()}, above "
        f"this server's limit of {config.max_explanation_memory_mb} MiB (max_explanation_memory_mb); use a "
        f"shorter input, {field}.method MATRIX_FREE, {field}.top_k 0 (attributions only), positions LAST, no "
        f"include_jacobians{chunk}",
        final=True,
    )


def _concept_ids(loaded: LoadedModel, spec: ConceptSpec, config: ServerConfig) -> list[int]:
    """The concept prompt as token ids, checked like a request's input (OptionError naming ``prompt``)."""
    if isinstance(spec.prompt, str):
        try:
            ids = encode_text(loaded.tokenizer, spec.prompt)
        except InputError as error:
            raise OptionError("prompt", str(error).removeprefix("input.text ")) from None
    else:
        ids = [check_token_id(int(t), loaded.vocab_size, f"prompt[{i}]") for i, t in enumerate(spec.prompt)]
    limit = config.max_prompt_tokens or loaded.max_positions
    if limit and len(ids) > limit:
        raise OptionError("prompt", f"has {len(ids)} tokens, above this server's limit of {limit}; shorten it")
    return ids


def concept_work(
    loaded: LoadedModel,
    spec: ConceptSpec,
    config: ServerConfig,
    *,
    steering_layer: int | None = None,
    tokens_per_vector: int = DEFAULT_CONCEPT_TOKENS,
) -> ConceptWork:
    """Admit a concept vector's computation: the prompt, the map's layer, the rank against the model and this
    server's limits, and the explanation's memory. OptionError names the field below the ConceptSpec."""
    ids = _concept_ids(loaded, spec, config)
    layer = spec.resolved_layer(loaded.num_layers, steering_layer)
    if spec.rank > loaded.hidden_size:
        raise OptionError("rank", f"is {spec.rank}, above the model's hidden size {loaded.hidden_size}")
    if spec.rank > config.max_top_k:
        raise OptionError(
            "rank", f"is {spec.rank}, above this server's limit of {config.max_top_k} (max_top_k); take a lower rank"
        )
    options = concept_options(spec, layer, tokens_per_vector)
    loaded.explainer.validate(ids, options)
    options = _fit_memory(options, "concept", len(ids), loaded, config)
    return ConceptWork(loaded, ids, spec, layer, options, tokens_per_vector)


def steering_work(message: pb.Steering, loaded: LoadedModel, config: ServerConfig) -> SteeringWork:
    """Admit a request's ``steering`` (RpcFailure INVALID_ARGUMENT naming the field, e.g. ``steering.layer``)."""
    try:
        steering = steering_from_proto(message)
        layer = steering.resolved_layer(loaded.num_layers)
        steering.check_vector(loaded.hidden_size)
        concept = None
        if steering.concept is not None:
            try:
                concept = concept_work(loaded, steering.concept, config, steering_layer=layer)
            except OptionError as error:
                raise error.under("concept_prompt") from None
    except OptionError as error:
        raise invalid(str(error.under("steering"))) from None
    return SteeringWork(steering, layer, concept)


def prepare_concept(request: pb.ComputeConceptRequest, host: ModelHost, config: ServerConfig) -> ConceptWork:
    """Admit a ComputeConcept request (RpcFailure for an unknown or unready model, or bad input)."""
    loaded = host.ready(request.model)
    try:
        if not request.HasField("concept"):
            raise OptionError("concept", "is missing: give the concept prompt and which singular vector to take")
        try:
            spec = concept_spec_from_proto(request.concept)
        except OptionError as error:
            raise error.under("concept") from None
        tokens = request.tokens_per_vector if request.HasField("tokens_per_vector") else DEFAULT_CONCEPT_TOKENS
        if tokens < 1:
            raise OptionError("tokens_per_vector", f"must be at least 1, got {tokens}")
        if tokens > config.max_tokens_per_vector:
            raise OptionError(
                "tokens_per_vector",
                f"is {tokens}, above this server's limit of {config.max_tokens_per_vector} (max_tokens_per_vector)",
            )
        try:
            return concept_work(loaded, spec, config, tokens_per_vector=tokens)
        except OptionError as error:
            raise error.under("concept") from None
    except OptionError as error:
        raise invalid(str(error)) from None


def prepare_explain(
    request: pb.ExplainRequest | pb.ExplainStreamRequest, host: ModelHost, config: ServerConfig
) -> ExplainWork:
    """Admit an Explain or ExplainStream request (RpcFailure for an unknown or unready model, or bad input)."""
    loaded = host.ready(request.model)
    prompt_ids = encode_input(loaded, request.input, config)
    options, _ = explain_options(request.options, "options", loaded, prompt_ids, config)
    return ExplainWork(loaded, prompt_ids, options)


def prepare_generation(
    request: pb.GenerateRequest | pb.GenerateStreamRequest, host: ModelHost, config: ServerConfig
) -> GenerationWork:
    """Admit a Generate or GenerateStream request."""
    loaded = host.ready(request.model)
    prompt_ids = encode_input(loaded, request.input, config)
    sampling = sampling_from_proto(request.sampling if request.HasField("sampling") else None, config)
    steering = steering_work(request.steering, loaded, config) if request.HasField("steering") else None
    if not request.HasField("explain"):
        return GenerationWork(loaded, prompt_ids, sampling, None, None, steering)
    if steering is not None:
        raise invalid(
            "steering cannot be combined with explain yet: an explanation of the unsteered model would not explain "
            "the steered tokens; generate steered, then explain (or drop one of the two)"
        )
    options, steps = explain_options(
        request.explain, "explain", loaded, prompt_ids, config, max_new_tokens=sampling.max_new_tokens
    )
    return GenerationWork(loaded, prompt_ids, sampling, options, steps)


__all__ = [
    "ConceptWork",
    "ExplainWork",
    "GenerationWork",
    "SteeringWork",
    "concept_work",
    "encode_input",
    "explain_options",
    "prepare_concept",
    "prepare_explain",
    "prepare_generation",
    "sampling_from_proto",
    "steering_work",
]
