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
    """A Python enum and its protobuf enum, both ways, paired by name: member ``NAME`` is the protobuf value
    ``<PREFIX>_NAME`` (``Precision.FLOAT32`` is ``PRECISION_FLOAT32``), so a new member needs no edit here.

    Unspecified (0) decodes to ``default``, and so does an unknown number when ``lenient`` (a newer server's value
    that a reader can live without); otherwise an unknown number is an OptionError. A protobuf value without a
    member, or a member without a value, fails at import.
    """

    def __init__(self, pb_enum: Any, kind: type[E], default: E, *, lenient: bool = False) -> None:
        descriptor = pb_enum.DESCRIPTOR
        self.name: str = descriptor.name
        self.full_name: str = descriptor.full_name
        prefix = descriptor.values_by_number[0].name.removesuffix("UNSPECIFIED")
        self._to_pb: dict[E, int] = {member: pb_enum.Value(prefix + member.name) for member in kind}
        self._from_pb = {number: member for member, number in self._to_pb.items()}
        unmatched = [v.name for v in descriptor.values if v.number != 0 and v.number not in self._from_pb]
        if unmatched:
            raise TypeError(f"{kind.__name__} has no member for {self.name} value(s) {unmatched}")
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


_PRECISION = _EnumTable(pb.Precision, Precision, Precision.FLOAT32)
_GATE_MODE = _EnumTable(pb.GateMode, GateMode, GateMode.FREEZE_GATE)
_POSITIONS = _EnumTable(pb.PositionSelection, PositionSelection, PositionSelection.LAST)
_METHOD = _EnumTable(pb.ExplainMethod, ExplainMethod, ExplainMethod.AUTO)
#: lenient: a newer server's reason reads as unspecified rather than failing the call (likewise a state)
_FINISH = _EnumTable(pb.FinishReason, FinishReason, FinishReason.UNSPECIFIED, lenient=True)
_MODEL_STATE = _EnumTable(pb.ModelState, ModelState, ModelState.UNSPECIFIED, lenient=True)
_CONCEPT_MAP = _EnumTable(pb.ConceptMap, ConceptMap, ConceptMap.OUTPUT)
_SIDE = _EnumTable(pb.SingularSide, SingularSide, SingularSide.LEFT)
_STEERING_POSITIONS = _EnumTable(pb.SteeringPositions, SteeringPositions, SteeringPositions.ALL)
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
