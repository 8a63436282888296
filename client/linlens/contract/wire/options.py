"""Options, both ways: ExplainOptions, LayerAnalysisOptions, ConceptSpec, Steering (mirrors ``contract/options.py``).

Fields travel by name (``codec.Codec``); written here by hand are only the fields whose wire form differs from the
dataclass: ``steps`` (an enum plus ``step_indices``), the layer selection ("all" / ``every``: empty or 0 on the
wire) and the oneofs (the concept prompt, the steering concept).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from linlens.contract.options import (
    AttributionTarget,
    ConceptSpec,
    ExplainOptions,
    LayerAnalysisOptions,
    OptionError,
    Steering,
)
from linlens.contract.tensors import array_from_tensor, tensor_from_array
from linlens.contract.wire.codec import Codec, same_names
from linlens.contract.wire.enums import _STEPS
from linlens.v1 import linlens_pb2 as pb

same_names(AttributionTarget)  # reached only inside ExplainOptions


def _write_layers(options: LayerAnalysisOptions, message: pb.LayerAnalysisOptions) -> None:
    if options.layers != "all":
        message.layers.extend(options.layers)
    if options.every is not None:
        message.every = options.every


def _read_layers(message: pb.LayerAnalysisOptions) -> dict[str, Any]:
    """An empty ``layers`` and ``every`` 0 mean "all" (the dataclass defaults)."""
    fields: dict[str, Any] = {}
    if message.layers:
        fields["layers"] = tuple(message.layers)
    if message.every:
        fields["every"] = message.every
    return fields


_LAYERS = Codec(
    LayerAnalysisOptions,
    pb.LayerAnalysisOptions,
    by_hand=("layers", "every"),
    write=_write_layers,
    read=_read_layers,
    under="layers",
)


def _write_steps(options: ExplainOptions, message: pb.ExplainOptions) -> None:
    if isinstance(options.steps, str):
        message.steps = _STEPS[options.steps]
    else:
        message.steps = pb.EXPLAIN_STEPS_LIST
        message.step_indices.extend(options.steps)


def _read_steps(message: pb.ExplainOptions) -> dict[str, Any]:
    if message.steps in (pb.EXPLAIN_STEPS_UNSPECIFIED, pb.EXPLAIN_STEPS_FIRST):
        return {"steps": "first"}
    if message.steps == pb.EXPLAIN_STEPS_ALL:
        return {"steps": "all"}
    if message.steps == pb.EXPLAIN_STEPS_LIST:
        return {"steps": tuple(message.step_indices)}
    raise OptionError("steps", f"{message.steps} is not a known ExplainSteps value")


_EXPLAIN = Codec(
    ExplainOptions, pb.ExplainOptions, by_hand=("steps", "step_indices"), write=_write_steps, read=_read_steps
)


#: Unset fields take the dataclass defaults; OptionError names the field under ``layers``.
layer_options_to_proto, layer_options_from_proto = _LAYERS.to_proto, _LAYERS.from_proto
#: The options a request asked for; unset fields take the dataclass defaults. Raises OptionError.
explain_options_to_proto, explain_options_from_proto = _EXPLAIN.to_proto, _EXPLAIN.from_proto


def _write_prompt(spec: ConceptSpec, message: pb.ConceptSpec) -> None:
    if isinstance(spec.prompt, str):
        message.prompt.text = spec.prompt
    else:
        message.prompt.token_ids.ids.extend(spec.prompt)


def _read_prompt(message: pb.ConceptSpec) -> dict[str, Any]:
    kind = message.prompt.WhichOneof("kind")
    if kind == "text":
        return {"prompt": message.prompt.text}
    if kind == "token_ids":
        return {"prompt": tuple(message.prompt.token_ids.ids)}
    if kind == "chat":
        raise OptionError("prompt", "is a chat: give the concept prompt as text or token ids")
    raise OptionError("prompt", "is missing: give the concept prompt as text or token ids")


_CONCEPT = Codec(ConceptSpec, pb.ConceptSpec, by_hand=("prompt",), write=_write_prompt, read=_read_prompt)


#: The spec a request asked for (unset fields take the dataclass defaults). Raises OptionError.
concept_spec_to_proto, concept_spec_from_proto = _CONCEPT.to_proto, _CONCEPT.from_proto


def _write_concept(steering: Steering, message: pb.Steering) -> None:
    if steering.concept is not None:
        message.concept_prompt.CopyFrom(concept_spec_to_proto(steering.concept))
    else:
        message.vector.CopyFrom(tensor_from_array(np.asarray(steering.vector, dtype=np.float32)))


def _read_concept(message: pb.Steering) -> dict[str, Any]:
    """The oneof ``concept``; OptionError names the field below ``steering`` (e.g. ``vector``)."""
    kind = message.WhichOneof("concept")
    if kind == "concept_prompt":
        try:
            return {"concept": concept_spec_from_proto(message.concept_prompt)}
        except OptionError as error:
            raise error.under("concept_prompt") from None
    if kind == "vector":
        try:
            return {"vector": array_from_tensor(message.vector)}
        except ValueError as error:
            raise OptionError("vector", f"is not a valid tensor: {error}") from None
    raise OptionError("concept", "is missing: set concept_prompt or vector")


_STEERING = Codec(Steering, pb.Steering, by_hand=("concept_prompt", "vector"), write=_write_concept, read=_read_concept)


#: The steering a request asked for; OptionError names the field below ``steering`` (e.g. ``vector``).
steering_to_proto, steering_from_proto = _STEERING.to_proto, _STEERING.from_proto
