"""The wire's enum tables (each Python enum and its protobuf enum, both ways) and the small value codecs."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from linlens.contract.options import (
    ConceptMap,
    ExplainMethod,
    GateMode,
    OptionError,
    PositionSelection,
    Precision,
    SingularSide,
    SteeringPositions,
)
from linlens.contract.results import (
    FinishReason,
    FloatArray,
    ModelState,
)
from linlens.v1 import linlens_pb2 as pb

E = TypeVar("E", bound=enum.Enum)


class _EnumTable(Generic[E]):
    """A Python enum and its protobuf enum, both ways. Unspecified (0) decodes to ``default``, and so does an
    unknown number when ``lenient`` (a newer server's value that a reader can live without); otherwise an unknown
    number is an OptionError."""

    def __init__(self, pb_enum: Any, pairs: dict[E, int], default: E, *, lenient: bool = False) -> None:
        self.name: str = pb_enum.DESCRIPTOR.name
        self.full_name: str = pb_enum.DESCRIPTOR.full_name
        self._to_pb = pairs
        self._from_pb = {number: member for member, number in pairs.items()}
        self._default = default
        self._lenient = lenient

    def to_pb(self, member: E) -> Any:
        return self._to_pb[member]

    def from_pb(self, number: int, field: str) -> E:
        if number == 0:
            return self._default
        try:
            return self._from_pb[number]
        except KeyError:
            if self._lenient:
                return self._default
            raise OptionError(field, f"{number} is not a known {self.name} value") from None


_PRECISION = _EnumTable(
    pb.Precision,
    {
        Precision.FLOAT32: pb.PRECISION_FLOAT32,
        Precision.FLOAT64: pb.PRECISION_FLOAT64,
        Precision.BFLOAT16: pb.PRECISION_BFLOAT16,
    },
    Precision.FLOAT32,
)
_GATE_MODE = _EnumTable(
    pb.GateMode,
    {GateMode.FREEZE_GATE: pb.GATE_MODE_FREEZE_GATE, GateMode.FREEZE_UP: pb.GATE_MODE_FREEZE_UP},
    GateMode.FREEZE_GATE,
)
_POSITIONS = _EnumTable(
    pb.PositionSelection,
    {
        PositionSelection.LAST: pb.POSITION_SELECTION_LAST,
        PositionSelection.ALL: pb.POSITION_SELECTION_ALL,
        PositionSelection.LIST: pb.POSITION_SELECTION_LIST,
    },
    PositionSelection.LAST,
)
_METHOD = _EnumTable(
    pb.ExplainMethod,
    {
        ExplainMethod.AUTO: pb.EXPLAIN_METHOD_AUTO,
        ExplainMethod.FULL: pb.EXPLAIN_METHOD_FULL,
        ExplainMethod.MATRIX_FREE: pb.EXPLAIN_METHOD_MATRIX_FREE,
    },
    ExplainMethod.AUTO,
)
_FINISH = _EnumTable(
    pb.FinishReason,
    {
        FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
        FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
        FinishReason.EOS: pb.FINISH_REASON_EOS,
        FinishReason.CONTEXT_LENGTH: pb.FINISH_REASON_CONTEXT_LENGTH,
        FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
        FinishReason.UNSPECIFIED: pb.FINISH_REASON_UNSPECIFIED,
    },
    FinishReason.UNSPECIFIED,
    lenient=True,  # a newer server's reason reads as unspecified rather than failing the call
)
_MODEL_STATE = _EnumTable(
    pb.ModelState,
    {
        ModelState.LOADING: pb.MODEL_STATE_LOADING,
        ModelState.READY: pb.MODEL_STATE_READY,
        ModelState.FAILED: pb.MODEL_STATE_FAILED,
        ModelState.UNSPECIFIED: pb.MODEL_STATE_UNSPECIFIED,
    },
    ModelState.UNSPECIFIED,
    lenient=True,  # a newer server's state
)
_CONCEPT_MAP = _EnumTable(
    pb.ConceptMap, {ConceptMap.OUTPUT: pb.CONCEPT_MAP_OUTPUT, ConceptMap.LAYER: pb.CONCEPT_MAP_LAYER}, ConceptMap.OUTPUT
)
_SIDE = _EnumTable(
    pb.SingularSide,
    {SingularSide.LEFT: pb.SINGULAR_SIDE_LEFT, SingularSide.RIGHT: pb.SINGULAR_SIDE_RIGHT},
    SingularSide.LEFT,
)
_STEERING_POSITIONS = _EnumTable(
    pb.SteeringPositions,
    {
        SteeringPositions.PROMPT: pb.STEERING_POSITIONS_PROMPT,
        SteeringPositions.GENERATED: pb.STEERING_POSITIONS_GENERATED,
        SteeringPositions.ALL: pb.STEERING_POSITIONS_ALL,
    },
    SteeringPositions.ALL,
)
#: The tables by protobuf enum (full name): the codecs (``codec.py``) find a field's table from its descriptor.
ENUMS: dict[str, _EnumTable[Any]] = {
    table.full_name: table
    for table in (
        _PRECISION,
        _GATE_MODE,
        _POSITIONS,
        _METHOD,
        _FINISH,
        _MODEL_STATE,
        _CONCEPT_MAP,
        _SIDE,
        _STEERING_POSITIONS,
    )
}
_COMPONENT = {"attention": pb.LAYER_COMPONENT_ATTENTION, "mlp": pb.LAYER_COMPONENT_MLP}
_COMPONENT_FROM_PB = {number: name for name, number in _COMPONENT.items()}
_STEPS = {"first": pb.EXPLAIN_STEPS_FIRST, "all": pb.EXPLAIN_STEPS_ALL}


def _unsigned(field: str, value: int) -> int:
    """A value for an unsigned wire field; negative ones get a message naming the field, not protobuf's."""
    if value < 0:
        raise OptionError(field, f"must be >= 0 (it is unsigned on the wire), got {value}")
    return int(value)


def _doubles(values: Sequence[float]) -> FloatArray:
    array: FloatArray = np.array(values, dtype=np.float64)
    array.flags.writeable = False
    return array


def _double_list(values: Any) -> list[float]:
    return [float(v) for v in np.asarray(values).ravel()]
