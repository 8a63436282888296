"""Options, both ways: ExplainOptions, LayerAnalysisOptions, ConceptSpec, Steering (mirrors ``contract/options.py``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from linlens.contract.options import (
    ConceptSpec,
    ExplainOptions,
    LayerAnalysisOptions,
    OptionError,
    Steering,
)
from linlens.contract.tensors import array_from_tensor, tensor_from_array
from linlens.contract.wire.enums import (
    _CONCEPT_MAP,
    _GATE_MODE,
    _METHOD,
    _POSITIONS,
    _PRECISION,
    _SIDE,
    _STEERING_POSITIONS,
    _STEPS,
    _unsigned,
)
from linlens.v1 import linlens_pb2 as pb

# ----------------------------------------------------------------------------------------------------------------
# Request options
# ----------------------------------------------------------------------------------------------------------------


def layer_options_to_proto(options: LayerAnalysisOptions) -> pb.LayerAnalysisOptions:
    message = pb.LayerAnalysisOptions(
        up_to_layer=options.up_to_layer,
        layer_alone=options.layer_alone,
        component_spectra=options.component_spectra,
        top_k=_unsigned("layers.top_k", options.top_k),
        tokens_per_vector=_unsigned("layers.tokens_per_vector", options.tokens_per_vector),
    )
    if options.layers != "all":
        message.layers.extend(options.layers)
    if options.every is not None:
        message.every = options.every
    return message


def layer_options_from_proto(message: pb.LayerAnalysisOptions) -> LayerAnalysisOptions:
    """Unset fields take the dataclass defaults; an empty ``layers`` and ``every`` 0 mean "all"."""
    fields: dict[str, Any] = {
        "layer_alone": message.layer_alone,
        "component_spectra": message.component_spectra,
    }
    if message.layers:
        fields["layers"] = tuple(message.layers)
    if message.every:
        fields["every"] = message.every
    for name in ("up_to_layer", "top_k", "tokens_per_vector"):
        if message.HasField(name):
            fields[name] = getattr(message, name)
    try:
        return LayerAnalysisOptions(**fields)
    except OptionError as error:
        raise error.under("layers") from None


def explain_options_to_proto(options: ExplainOptions) -> pb.ExplainOptions:
    message = pb.ExplainOptions(
        top_k=_unsigned("top_k", options.top_k),
        tokens_per_vector=_unsigned("tokens_per_vector", options.tokens_per_vector),
        positions=_POSITIONS.to_pb(options.positions),
        include_jacobians=options.include_jacobians,
        precision=_PRECISION.to_pb(options.precision),
        ordinary_contrast=options.ordinary_contrast,
        gate_mode=_GATE_MODE.to_pb(options.gate_mode),
        method=_METHOD.to_pb(options.method),
        position_indices=list(options.position_indices),
        prompt_spectrum=options.prompt_spectrum,
    )
    if isinstance(options.steps, str):
        message.steps = _STEPS[options.steps]
    else:
        message.steps = pb.EXPLAIN_STEPS_LIST
        message.step_indices.extend(options.steps)
    if options.explained_token_id is not None:
        message.explained_token_id = options.explained_token_id
    if options.vjp_chunk_size is not None:
        message.vjp_chunk_size = options.vjp_chunk_size
    for target in options.attribution_targets:
        entry = message.targets.add(token_id=target.token_id)
        if target.contrast_token_id is not None:
            entry.contrast_token_id = target.contrast_token_id
    if options.layers is not None:
        message.layers.CopyFrom(layer_options_to_proto(options.layers))
    return message


def explain_options_from_proto(message: pb.ExplainOptions) -> ExplainOptions:
    """The options a request asked for; unset fields take the dataclass defaults. Raises OptionError."""
    steps: Any
    if message.steps in (pb.EXPLAIN_STEPS_UNSPECIFIED, pb.EXPLAIN_STEPS_FIRST):
        steps = "first"
    elif message.steps == pb.EXPLAIN_STEPS_ALL:
        steps = "all"
    elif message.steps == pb.EXPLAIN_STEPS_LIST:
        steps = tuple(message.step_indices)
    else:
        raise OptionError("steps", f"{message.steps} is not a known ExplainSteps value")
    fields: dict[str, Any] = {
        "steps": steps,
        "positions": _POSITIONS.from_pb(message.positions, "positions"),
        "include_jacobians": message.include_jacobians,
        "precision": _PRECISION.from_pb(message.precision, "precision"),
        "ordinary_contrast": message.ordinary_contrast,
        "gate_mode": _GATE_MODE.from_pb(message.gate_mode, "gate_mode"),
        "method": _METHOD.from_pb(message.method, "method"),
        "position_indices": tuple(message.position_indices),
        "prompt_spectrum": message.prompt_spectrum,
        "targets": tuple(
            (t.token_id, t.contrast_token_id if t.HasField("contrast_token_id") else None) for t in message.targets
        ),
    }
    for name in ("top_k", "tokens_per_vector", "explained_token_id", "vjp_chunk_size"):
        if message.HasField(name):
            fields[name] = getattr(message, name)
    if message.HasField("layers"):
        fields["layers"] = layer_options_from_proto(message.layers)
    return ExplainOptions(**fields)


def concept_spec_to_proto(spec: ConceptSpec) -> pb.ConceptSpec:
    message = pb.ConceptSpec(map=_CONCEPT_MAP.to_pb(spec.map), side=_SIDE.to_pb(spec.side), rank=spec.rank)
    if isinstance(spec.prompt, str):
        message.prompt.text = spec.prompt
    else:
        message.prompt.token_ids.ids.extend(spec.prompt)
    if spec.layer is not None:
        message.layer = spec.layer
    return message


def concept_spec_from_proto(message: pb.ConceptSpec) -> ConceptSpec:
    """The spec a request asked for (unset fields take the dataclass defaults). Raises OptionError."""
    kind = message.prompt.WhichOneof("kind")
    prompt: str | tuple[int, ...]
    if kind == "text":
        prompt = message.prompt.text
    elif kind == "token_ids":
        prompt = tuple(message.prompt.token_ids.ids)
    elif kind == "chat":
        raise OptionError("prompt", "is a chat: give the concept prompt as text or token ids")
    else:
        raise OptionError("prompt", "is missing: give the concept prompt as text or token ids")
    fields: dict[str, Any] = {
        "prompt": prompt,
        "map": _CONCEPT_MAP.from_pb(message.map, "map"),
        "side": _SIDE.from_pb(message.side, "side"),
    }
    for name in ("layer", "rank"):
        if message.HasField(name):
            fields[name] = getattr(message, name)
    return ConceptSpec(**fields)


def steering_to_proto(steering: Steering) -> pb.Steering:
    message = pb.Steering(strength=steering.strength, positions=_STEERING_POSITIONS.to_pb(steering.positions))
    if steering.concept is not None:
        message.concept_prompt.CopyFrom(concept_spec_to_proto(steering.concept))
    else:
        message.vector.CopyFrom(tensor_from_array(np.asarray(steering.vector, dtype=np.float32)))
    if steering.layer is not None:
        message.layer = steering.layer
    return message


def steering_from_proto(message: pb.Steering) -> Steering:
    """The steering a request asked for; OptionError names the field below ``steering`` (e.g. ``vector``)."""
    fields: dict[str, Any] = {"positions": _STEERING_POSITIONS.from_pb(message.positions, "positions")}
    kind = message.WhichOneof("concept")
    if kind == "concept_prompt":
        try:
            fields["concept"] = concept_spec_from_proto(message.concept_prompt)
        except OptionError as error:
            raise error.under("concept_prompt") from None
    elif kind == "vector":
        try:
            fields["vector"] = array_from_tensor(message.vector)
        except ValueError as error:
            raise OptionError("vector", f"is not a valid tensor: {error}") from None
    else:
        raise OptionError("concept", "is missing: set concept_prompt or vector")
    if message.HasField("layer"):
        fields["layer"] = message.layer
    if message.HasField("strength"):
        fields["strength"] = message.strength
    return Steering(**fields)
