"""Every field of every message the contract maps survives the wire, found from the proto's descriptors (issue 18).

The test does not list fields by hand. For each ``Codec`` (``contract/wire/codec.py``: every message the contract maps,
nested ones included) and each hand-written pair ``X_to_proto`` / ``X_from_proto`` left in linlens.contract.wire, it
builds the message with *every* field set (walking the message's descriptor, nested messages included; each member of
a oneof in turn), converts it to the contract's dataclass and back, and expects the same message. A field added to the
proto and forgotten in the mapping comes back unset (or, with no dataclass field of its name, fails the codec), and
the test names it.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from linlens.contract import wire
from linlens.contract.tensors import tensor_from_array
from linlens.contract.wire import codec, options, responses, results  # noqa: F401 (the modules walked below)
from linlens.v1 import linlens_pb2 as pb

#: Values a rule of the contract needs besides "every field set": message name -> field -> value.
VALID: dict[str, dict[str, Any]] = {
    # position_indices go with positions=LIST; steps=LIST needs step_indices (and the reverse)
    "ExplainOptions": {"positions": pb.POSITION_SELECTION_LIST, "steps": pb.EXPLAIN_STEPS_LIST},
}
#: Fields that exclude each other by a rule of the contract (not a oneof): each is set in a variant of its own.
EXCLUSIVE: dict[str, tuple[str, ...]] = {"LayerAnalysisOptions": ("every", "layers")}


def _pairs() -> Iterator[tuple[type[Message], Callable[[Any], Any], Callable[[Any], Any]]]:
    # every Codec (each message mapped by construction, nested ones included), then the hand-written pairs left
    # (the streams' oneof envelopes)
    for mapping in codec._CODECS.values():
        yield mapping.message_class, mapping.to_proto, mapping.from_proto
    for module in (wire.options, wire.results, wire.responses):
        yield from _module_pairs(module)


def _module_pairs(module: Any) -> Iterator[tuple[type[Message], Callable[[Any], Any], Callable[[Any], Any]]]:
    for name, to_proto in inspect.getmembers(module, inspect.isfunction):
        if not name.endswith("_to_proto") or to_proto.__module__ != module.__name__:
            continue
        from_proto = getattr(module, name.removesuffix("_to_proto") + "_from_proto", None)
        message = typing.get_type_hints(to_proto).get("return")
        if from_proto is not None and isinstance(message, type) and issubclass(message, Message):
            yield message, to_proto, from_proto


PAIRS = sorted(_pairs(), key=lambda p: p[0].DESCRIPTOR.name)


def _repeated(field: FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 6 has no label
    return bool(repeated) if repeated is not None else getattr(field, "label", None) == FieldDescriptor.LABEL_REPEATED


def _value(field: FieldDescriptor, depth: int, choice: dict[str, str]) -> Any:
    if field.type == FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in (field.enum_type.values if field.enum_type else ()) if v.number != 0]
        return values[-1]
    if field.type == FieldDescriptor.TYPE_BOOL:
        return True
    if field.type == FieldDescriptor.TYPE_STRING:
        return "x"
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return 0.5
    if field.type == FieldDescriptor.TYPE_BYTES:
        return b"x"
    return 2  # integers: above 1, so that a rank or a count is not its default


def full(descriptor: Any, depth: int = 0, choice: dict[str, str] | None = None, pick: int = 0) -> Message:
    """The message with every field set (for a oneof, the member ``choice`` names, else its first; of EXCLUSIVE
    fields, the ``pick``-th)."""
    choice = choice or {}
    message_class: type[Message] = getattr(pb, descriptor.name)
    message = message_class()
    if descriptor.name == "Tensor":
        message.CopyFrom(tensor_from_array(np.array([0.25, 0.5], dtype=np.float32)))
        return message
    exclusive = EXCLUSIVE.get(descriptor.name, ())
    skipped = {f for i, f in enumerate(exclusive) if i != pick}
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None and choice.get(oneof.name, oneof.fields[0].name) != field.name:
            continue
        if field.name in skipped:
            continue
        if field.message_type is not None:
            if depth > 6:
                continue
            value = full(field.message_type, depth + 1)
            if _repeated(field):
                getattr(message, field.name).add().CopyFrom(value)
            else:
                getattr(message, field.name).CopyFrom(value)
            continue
        value = VALID.get(descriptor.name, {}).get(field.name, _value(field, depth, choice))
        if _repeated(field):
            getattr(message, field.name).extend([value])
        else:
            setattr(message, field.name, value)
    return message


def variants(descriptor: Any) -> Iterator[tuple[str, Message]]:
    """The full message once per member of each oneof (members of nested oneofs take their first)."""
    yield "all fields", full(descriptor)
    for oneof in descriptor.oneofs:
        for member in oneof.fields[1:]:
            yield f"{oneof.name}={member.name}", full(descriptor, choice={oneof.name: member.name})
    for pick, name in enumerate(EXCLUSIVE.get(descriptor.name, ())[1:], start=1):
        yield f"{name} set", full(descriptor, pick=pick)


def unset(expected: Message, got: Message, path: str = "") -> list[str]:
    """The fields set in ``expected`` that differ in ``got``, as dotted paths."""
    out: list[str] = []
    for field, value in expected.ListFields():
        name = f"{path}{field.name}"
        other = getattr(got, field.name)
        if field.message_type is not None and not _repeated(field):
            if not got.HasField(field.name):
                out.append(name)
            else:
                out.extend(unset(value, other, name + "."))
        elif field.message_type is not None:
            if len(other) != len(value):
                out.append(name)
            else:
                for i, (a, b) in enumerate(zip(value, other, strict=True)):
                    out.extend(unset(a, b, f"{name}[{i}]."))
        elif value != other:
            out.append(name)
    return out


@pytest.mark.parametrize(("message_class", "to_proto", "from_proto"), PAIRS, ids=[p[0].DESCRIPTOR.name for p in PAIRS])
def test_every_field_survives_the_round_trip(
    message_class: type[Message], to_proto: Callable[[Any], Any], from_proto: Callable[[Any], Any]
) -> None:
    for variant, message in variants(message_class.DESCRIPTOR):
        back = to_proto(from_proto(message))
        lost = unset(message, back)
        assert not lost, f"{message_class.DESCRIPTOR.name} ({variant}): the mapping loses {lost}"


def test_every_result_and_option_message_is_covered() -> None:
    """Each message is mapped itself or sits inside one that is (requests are built in contract/requests.py)."""
    reached: set[str] = set()

    def walk(descriptor: Any) -> None:
        if descriptor.name in reached:
            return
        reached.add(descriptor.name)
        for field in descriptor.fields:
            if field.message_type is not None:
                walk(field.message_type)

    for message_class, _, _ in PAIRS:
        walk(message_class.DESCRIPTOR)
    requests = {name for name in pb.DESCRIPTOR.message_types_by_name if name.endswith("Request")}
    inputs = {"Input", "TokenIds", "ChatMessage", "ChatConversation", "SamplingParams"}  # contract/requests.py
    # one-field envelopes of mapped messages, opened where they are read (the SDK's client, the servicer)
    envelopes = {"ExplainStreamResponse", "GetModelResponse", "ListModelsResponse"}
    missing = set(pb.DESCRIPTOR.message_types_by_name) - reached - requests - inputs - envelopes
    assert not missing, f"messages no mapping covers: {sorted(missing)}"


def test_decoding_errors_name_the_field_by_its_path() -> None:
    """An OptionError from a nested message names its place: a repeated entry by index, the layer options under
    ``layers``, the steering concept under ``concept_prompt`` (what the servers' INVALID_ARGUMENT details say)."""
    from linlens.contract.options import ExplainOptions, LayerAnalysisOptions, OptionError

    message = pb.ExplainOptions()
    message.targets.add(token_id=5)
    message.targets.add(token_id=-3)
    with pytest.raises(OptionError, match=r"^targets\[1\]\.token_id "):
        wire.explain_options_from_proto(message)
    with pytest.raises(OptionError, match=r"^layers\.every "):
        wire.explain_options_from_proto(pb.ExplainOptions(layers=pb.LayerAnalysisOptions(every=2, layers=[1])))
    with pytest.raises(OptionError, match=r"^layers\.top_k "):
        layers = LayerAnalysisOptions(top_k=1)
        object.__setattr__(layers, "top_k", -1)  # past the dataclass's own rule: the wire's unsigned check
        wire.explain_options_to_proto(ExplainOptions(layers=layers))
    steering = pb.Steering(concept_prompt=pb.ConceptSpec(prompt=pb.Input(chat=pb.ChatConversation())))
    with pytest.raises(OptionError, match=r"^concept_prompt\.prompt "):
        wire.steering_from_proto(steering)
