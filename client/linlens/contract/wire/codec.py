"""The mapping by construction: a dataclass and its message, field by field, matched by name (issue 18).

A :class:`Codec` pairs one contract dataclass with one protobuf message. Every field of the message is carried to
and from the dataclass field of the same name, the way its type says: scalars as they are, repeated scalars as
tuples (as read-only float64 arrays where the dataclass holds an array), ``Tensor`` as numpy arrays, enums through
their table (``enums.ENUMS``), nested messages through their own codec. Only what differs is written by hand: the
fields a codec names in ``by_hand``, which its ``write`` / ``read`` hooks carry (oneofs, renamed fields, sentinel
values). So a new scalar option or result field needs no edit here, and a message field that is neither matched
nor declared by hand is refused when the codec is first used, naming it.

What unset means is decided by presence, once for all messages: a field the wire can leave unset (``optional``
scalars, messages) decodes to the dataclass default when it has one, else to None when its type admits None; a
value of None is left unset on the wire; an unspecified enum decodes to None where the dataclass default is None,
else to its table's default.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable
from types import UnionType
from typing import Any, Generic, TypeVar

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from linlens.contract.options import OptionError
from linlens.contract.tensors import array_from_tensor, tensor_from_array
from linlens.contract.wire.enums import ENUMS, _double_list, _doubles, _unsigned
from linlens.v1 import linlens_pb2 as pb

T = TypeVar("T")
M = TypeVar("M", bound=Message)

_UNSIGNED = (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64)
_FLOATING = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)
#: Every codec by message full name, so that a nested message finds its own (hand-written parts included).
_CODECS: dict[str, Codec[Any, Any]] = {}


def _repeated(field: FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 6 has no label
    return bool(repeated) if repeated is not None else getattr(field, "label", None) == FieldDescriptor.LABEL_REPEATED


def _admits_none(hint: Any) -> bool:
    return (typing.get_origin(hint) in (typing.Union, UnionType)) and type(None) in typing.get_args(hint)


def _is_array(hint: Any) -> bool:
    return typing.get_origin(hint) is np.ndarray


@dataclasses.dataclass(frozen=True)
class _Field:
    """How one message field travels: what the descriptor and the dataclass field's type say, worked out once."""

    name: str
    descriptor: FieldDescriptor
    repeated: bool
    #: The wire can leave it unset (optional scalar or message) and the dataclass has a use for that.
    presence: bool
    #: The dataclass field's default, or MISSING.
    default: Any
    admits_none: bool
    array: bool


class Codec(Generic[T, M]):
    """One dataclass <-> one message, matched by field name; ``by_hand`` fields go through ``write`` / ``read``.

    ``write(obj, message)`` sets the by-hand fields of a message the codec has filled with the others;
    ``read(message)`` returns the dataclass keyword arguments of the by-hand fields. ``under`` prefixes the field
    names in the OptionErrors this codec raises (e.g. ``layers.top_k`` for the layer options inside ExplainOptions).
    """

    def __init__(
        self,
        cls: type[T],
        message_class: type[M],
        *,
        by_hand: Iterable[str] = (),
        write: Callable[[T, M], None] | None = None,
        read: Callable[[M], dict[str, Any]] | None = None,
        under: str = "",
    ) -> None:
        self.cls = cls
        self.message_class = message_class
        self.by_hand = frozenset(by_hand)
        self._write = write
        self._read = read
        self._under = under
        self._plan: tuple[_Field, ...] | None = None
        _CODECS[message_class.DESCRIPTOR.full_name] = self

    @property
    def plan(self) -> tuple[_Field, ...]:
        """The matched fields (worked out on first use, when every module the type hints name is imported)."""
        if self._plan is None:
            self._plan = self._make_plan()
        return self._plan

    def _make_plan(self) -> tuple[_Field, ...]:
        descriptor: Any = self.message_class.DESCRIPTOR
        hints = typing.get_type_hints(self.cls)
        fields = {f.name: f for f in dataclasses.fields(self.cls)}  # type: ignore[arg-type]
        unknown = self.by_hand - set(descriptor.fields_by_name)
        if unknown:
            raise TypeError(f"{descriptor.name} has no field(s) {sorted(unknown)} (declared by hand)")
        plan = []
        for field in descriptor.fields:
            if field.name in self.by_hand:
                continue
            if field.name not in fields:
                raise TypeError(
                    f"{descriptor.name}.{field.name} has no field of that name in {self.cls.__name__}: add one, or "
                    "carry it by hand (Codec by_hand / write / read)"
                )
            dc_field = fields[field.name]
            default: Any = dataclasses.MISSING
            if dc_field.default is not dataclasses.MISSING:
                default = dc_field.default
            elif dc_field.default_factory is not dataclasses.MISSING:
                default = dc_field.default_factory()
            hint = hints[field.name]
            plan.append(
                _Field(
                    name=field.name,
                    descriptor=field,
                    repeated=_repeated(field),
                    # a required message (no default, never None) decodes even when unset, as an empty one
                    presence=bool(field.has_presence)
                    and not _repeated(field)
                    and (_admits_none(hint) or default is not dataclasses.MISSING),
                    default=default,
                    admits_none=_admits_none(hint),
                    array=_is_array(hint),
                )
            )
        return tuple(plan)

    def _error_name(self, name: str) -> str:
        return f"{self._under}.{name}" if self._under else name

    # ------------------------------------------------------------------------------------------------------------

    def to_proto(self, obj: T) -> M:
        """The message for ``obj``: every matched field, then the by-hand ones."""
        message = self.message_class()
        for f in self.plan:
            value = getattr(obj, f.name)
            if value is None:
                continue  # unset on the wire (an enum stays unspecified)
            _encode(message, f, value, self._error_name(f.name))
        if self._write is not None:
            self._write(obj, message)
        return message

    def from_proto(self, message: M) -> T:
        """The dataclass for ``message``; unset fields take the dataclass defaults. Raises OptionError."""
        try:
            kwargs: dict[str, Any] = {}
            for f in self.plan:
                if f.presence and not message.HasField(f.name):
                    if f.default is dataclasses.MISSING:
                        kwargs[f.name] = None
                    continue
                kwargs[f.name] = _decode(message, f)
            if self._read is not None:
                kwargs.update(self._read(message))
            return self.cls(**kwargs)
        except OptionError as error:
            if self._under:
                raise error.under(self._under) from None
            raise


def same_names(*classes: type) -> None:
    """A plain Codec for each dataclass whose message has its name (the ones only reached inside others)."""
    for cls in classes:
        Codec(cls, getattr(pb, cls.__name__))


def codec_of(descriptor: Descriptor | Any) -> Codec[Any, Any]:
    """The codec of a nested message; a message without one is a mapping that was forgotten."""
    if descriptor is None:
        raise TypeError("a oneof member that is not a message has no Codec")
    try:
        return _CODECS[descriptor.full_name]
    except KeyError:
        raise TypeError(f"no Codec maps the message {descriptor.name}") from None


def _encode(message: Message, f: _Field, value: Any, error_name: str) -> None:
    field = f.descriptor
    if field.message_type is not None:
        if field.message_type.name == "Tensor":
            getattr(message, f.name).CopyFrom(tensor_from_array(value))
            return
        codec = codec_of(field.message_type)
        if f.repeated:
            getattr(message, f.name).extend([codec.to_proto(v) for v in value])
        else:
            getattr(message, f.name).CopyFrom(codec.to_proto(value))
        return
    if field.enum_type is not None:
        table = ENUMS[field.enum_type.full_name]
        if f.repeated:
            getattr(message, f.name).extend([table.to_pb(v) for v in value])
        else:
            setattr(message, f.name, table.to_pb(value))
        return
    if f.repeated:
        getattr(message, f.name).extend(_double_list(value) if field.type in _FLOATING else list(value))
    elif field.type in _UNSIGNED:
        setattr(message, f.name, _unsigned(error_name, value))
    else:
        setattr(message, f.name, value)


def _decode(message: Message, f: _Field) -> Any:
    field = f.descriptor
    value = getattr(message, f.name)
    if field.message_type is not None:
        if field.message_type.name == "Tensor":
            return array_from_tensor(value)
        codec = codec_of(field.message_type)
        if not f.repeated:
            return codec.from_proto(value)
        items = []
        for index, item in enumerate(value):
            try:
                items.append(codec.from_proto(item))
            except OptionError as error:  # named as the entry it is, e.g. targets[2].token_id
                raise error.under(f"{f.name}[{index}]") from None
        return tuple(items)
    if field.enum_type is not None:
        table = ENUMS[field.enum_type.full_name]
        if f.repeated:
            return tuple(table.from_pb(v, f.name) for v in value)
        if value == 0 and f.default is None:
            return None
        return table.from_pb(value, f.name)
    if f.repeated:
        return _doubles(value) if f.array else tuple(value)
    return value


def oneof_to_proto(message_class: type[M], oneof: str, value: Any) -> M:
    """A message whose oneof ``oneof`` holds ``value``, in the member whose codec maps ``type(value)``."""
    for member in message_class.DESCRIPTOR.oneofs_by_name[oneof].fields:
        codec = codec_of(member.message_type)
        if isinstance(value, codec.cls):
            message = message_class()
            getattr(message, member.name).CopyFrom(codec.to_proto(value))
            return message
    raise TypeError(f"{message_class.DESCRIPTOR.name}.{oneof} has no member for {type(value).__name__}")


def oneof_from_proto(message: Message, oneof: str) -> Any:
    """What the oneof ``oneof`` of ``message`` holds, decoded; None when it is empty (a newer peer's member)."""
    kind = message.WhichOneof(oneof)
    if kind is None:
        return None
    member = message.DESCRIPTOR.fields_by_name[kind]
    return codec_of(member.message_type).from_proto(getattr(message, kind))
