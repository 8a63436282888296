"""The one mapping between the contract's dataclasses and its protobuf messages, in both directions.

The server encodes what the engine returns with the ``*_to_proto`` functions and decodes requests with the
``*_from_proto`` ones; the SDK does the opposite with the same functions. Each enum has one table (``enums``), and an
option left unset on the wire takes the dataclass default (``linlens.contract.options``), so defaults have one home
too. Decoding a request raises :class:`~linlens.contract.options.OptionError` for values the dataclasses refuse.

One module per message family, mirroring the contract: ``options`` (the requests' options), ``results`` (the result
types), ``responses`` (the messages they travel in) and ``enums`` (the enum tables all use).
``tests/test_wire_descriptors.py`` round-trips every field of every mapped message, found from the descriptors.
"""

from __future__ import annotations

from linlens.contract.wire.options import (
    concept_spec_from_proto,
    concept_spec_to_proto,
    explain_options_from_proto,
    explain_options_to_proto,
    layer_options_from_proto,
    layer_options_to_proto,
    steering_from_proto,
    steering_to_proto,
)
from linlens.contract.wire.responses import (
    explain_result_from_proto,
    explain_result_to_proto,
    explain_stream_event_from_proto,
    finish_reason_from_proto,
    generated_token_from_proto,
    generated_token_to_proto,
    generation_from_proto,
    generation_to_proto,
    model_info_from_proto,
    model_info_to_proto,
    progress_from_proto,
    progress_to_proto,
    stream_event_from_proto,
    stream_event_to_proto,
)
from linlens.contract.wire.results import (
    concept_vector_from_proto,
    concept_vector_to_proto,
    explanation_from_proto,
    explanation_to_proto,
    layer_attributions_from_proto,
    layer_attributions_to_proto,
    layer_result_from_proto,
    layer_result_to_proto,
    predicted_from_proto,
    predicted_to_proto,
    timings_from_proto,
    timings_to_proto,
)

__all__ = [
    "concept_spec_from_proto",
    "concept_spec_to_proto",
    "concept_vector_from_proto",
    "concept_vector_to_proto",
    "explain_options_from_proto",
    "explain_options_to_proto",
    "explain_result_from_proto",
    "explain_result_to_proto",
    "explain_stream_event_from_proto",
    "explanation_from_proto",
    "explanation_to_proto",
    "finish_reason_from_proto",
    "generated_token_from_proto",
    "generated_token_to_proto",
    "generation_from_proto",
    "generation_to_proto",
    "layer_attributions_from_proto",
    "layer_attributions_to_proto",
    "layer_options_from_proto",
    "layer_options_to_proto",
    "layer_result_from_proto",
    "layer_result_to_proto",
    "model_info_from_proto",
    "model_info_to_proto",
    "predicted_from_proto",
    "predicted_to_proto",
    "progress_from_proto",
    "progress_to_proto",
    "steering_from_proto",
    "steering_to_proto",
    "stream_event_from_proto",
    "stream_event_to_proto",
    "timings_from_proto",
    "timings_to_proto",
]
