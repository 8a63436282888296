"""Request messages from Python arguments: the keyword arguments every client shares, written once.

``Client``, ``AsyncClient`` and ``InProcessClient`` all take ``generate(prompt, **GenerateArgs)`` and
``explain(prompt, **ExplainArgs)``; these functions turn those arguments into the contract's request messages. They
check only what the wire itself needs (exactly one input form, the right Python types, no negative number in an
unsigned field). Every rule about values (a temperature, a step index, a limit) is the server's, which answers
INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias, TypedDict

from linlens.contract.options import ConceptSpec, ExplainOptions, Steering
from linlens.contract.wire import concept_spec_to_proto, explain_options_to_proto, steering_to_proto
from linlens.v1 import linlens_pb2 as pb


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation; ``role`` is what the model's chat template knows ("system", "user", ...)."""

    role: str
    content: str


#: What ``messages=`` accepts: ChatMessage objects, {"role": ..., "content": ...} mappings or (role, content) pairs.
MessageLike: TypeAlias = ChatMessage | Mapping[str, str] | tuple[str, str]


class InputArgs(TypedDict, total=False):
    """The input besides a positional ``prompt``: exactly one of prompt, token_ids or messages must be given."""

    #: Token ids used as they are (nothing added or removed).
    token_ids: Sequence[int] | None
    #: A conversation rendered with the model's chat template.
    messages: Sequence[MessageLike] | None
    #: With messages: append the template's "assistant turn starts here" suffix (default True).
    add_generation_prompt: bool
    #: The model to use; None or "" means the server's default model.
    model: str | None


class GenerateArgs(InputArgs, total=False):
    """Keyword arguments of ``generate`` and ``generate_stream`` (None leaves the server's default)."""

    #: Upper bound on generated tokens (server default 16).
    max_new_tokens: int | None
    #: 0 or None: greedy decoding; positive: sample from softmax(logits / temperature).
    temperature: float | None
    #: Nucleus sampling threshold in (0, 1]; 0/None/1 turn it off.
    top_p: float | None
    #: Sample only among the top_k most likely tokens; 0/None turn it off.
    top_k: int | None
    #: Seed of a sampled generation, so that it can be repeated.
    seed: int | None
    #: Stop as soon as the text contains one of these strings (the text is cut before it).
    stop: str | Sequence[str] | None
    #: Keep generating past the end-of-sequence token.
    ignore_eos: bool
    #: Explain generated steps: True (the first step, default options) or ExplainOptions.
    explain: ExplainOptions | bool | None
    #: Steer the generation toward a concept (a concept prompt or a cached concept vector); None: no steering.
    steering: Steering | None


def _keys(kind: type) -> frozenset[str]:
    """The keyword names a TypedDict of arguments allows (a misspelt keyword is a TypeError, as for a function)."""
    return frozenset(kind.__required_keys__) | frozenset(kind.__optional_keys__)  # type: ignore[attr-defined]


def _chat_message(message: MessageLike) -> pb.ChatMessage:
    if isinstance(message, ChatMessage):
        return pb.ChatMessage(role=message.role, content=message.content)
    if isinstance(message, Mapping):
        try:
            return pb.ChatMessage(role=str(message["role"]), content=str(message["content"]))
        except KeyError as exc:
            raise ValueError(f"chat message mapping needs 'role' and 'content', got keys {sorted(message)}") from exc
    if isinstance(message, tuple) and len(message) == 2:
        return pb.ChatMessage(role=str(message[0]), content=str(message[1]))
    raise TypeError(f"cannot use {message!r} as a chat message")


def build_input(
    prompt: str | None = None,
    token_ids: Sequence[int] | None = None,
    messages: Sequence[MessageLike] | None = None,
    *,
    add_generation_prompt: bool = True,
) -> pb.Input:
    """The Input message for exactly one of prompt text, token ids or chat messages."""
    given = [
        name
        for name, value in (("prompt", prompt), ("token_ids", token_ids), ("messages", messages))
        if value is not None
    ]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of prompt, token_ids or messages (got {', '.join(given) or 'none'})")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")
        return pb.Input(text=prompt)
    if token_ids is not None:
        if isinstance(token_ids, (str, bytes)):
            raise TypeError("token_ids must be a sequence of ints")
        return pb.Input(token_ids=pb.TokenIds(ids=[int(i) for i in token_ids]))
    assert messages is not None
    if isinstance(messages, (str, bytes)):
        raise TypeError("messages must be a sequence of chat messages")
    return pb.Input(
        chat=pb.ChatConversation(
            messages=[_chat_message(m) for m in messages], omit_generation_prompt=not add_generation_prompt
        )
    )


def _input(prompt: str | None, args: InputArgs) -> pb.Input:
    return build_input(
        prompt,
        args.get("token_ids"),
        args.get("messages"),
        add_generation_prompt=args.get("add_generation_prompt", True),
    )


def _unsigned(name: str, value: int) -> int:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def build_sampling(args: GenerateArgs) -> pb.SamplingParams:
    """SamplingParams from generate()'s keyword arguments; None leaves the server default."""
    sampling = pb.SamplingParams(ignore_eos=args.get("ignore_eos", False))
    if (max_new := args.get("max_new_tokens")) is not None:
        sampling.max_new_tokens = _unsigned("max_new_tokens", max_new)
    if (temperature := args.get("temperature")) is not None:
        sampling.temperature = temperature
    if (top_p := args.get("top_p")) is not None:
        sampling.top_p = top_p
    if (top_k := args.get("top_k")) is not None:
        sampling.top_k = _unsigned("top_k", top_k)
    if (seed := args.get("seed")) is not None:
        sampling.seed = _unsigned("seed", seed)
    stop = args.get("stop")
    if stop is not None:
        sampling.stop_sequences.extend([stop] if isinstance(stop, str) else list(stop))
    return sampling


def resolve_explain(explain: ExplainOptions | bool | None) -> ExplainOptions | None:
    """``explain=`` accepts options, True (all defaults) or False/None (no explanation)."""
    if explain is None or explain is False:
        return None
    if explain is True:
        return ExplainOptions()
    if isinstance(explain, ExplainOptions):
        return explain
    raise TypeError(f"explain must be ExplainOptions or a bool, not {type(explain).__name__}")


def generate_request(prompt: str | None, args: GenerateArgs) -> pb.GenerateRequest:
    """The GenerateRequest for ``generate(prompt, **args)`` (GenerateStream takes the same fields)."""
    unknown = set(args) - _keys(GenerateArgs)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    request = pb.GenerateRequest(
        model=args.get("model") or "", input=_input(prompt, args), sampling=build_sampling(args)
    )
    options = resolve_explain(args.get("explain"))
    if options is not None:
        request.explain.CopyFrom(explain_options_to_proto(options))
    steering = args.get("steering")
    if steering is not None:
        if not isinstance(steering, Steering):
            raise TypeError(f"steering must be Steering or None, not {type(steering).__name__}")
        request.steering.CopyFrom(steering_to_proto(steering))
    return request


def generate_stream_request(prompt: str | None, args: GenerateArgs) -> pb.GenerateStreamRequest:
    """The GenerateStreamRequest for ``generate_stream(prompt, **args)``: field for field a GenerateRequest."""
    request = pb.GenerateStreamRequest()
    request.ParseFromString(generate_request(prompt, args).SerializeToString())
    return request


def explain_stream_request(
    prompt: str | None, options: ExplainOptions | None, args: InputArgs
) -> pb.ExplainStreamRequest:
    """The ExplainStreamRequest for ``explain(prompt, options=..., on_progress=..., **args)``: an ExplainRequest."""
    request = pb.ExplainStreamRequest()
    request.ParseFromString(explain_request(prompt, options, args).SerializeToString())
    return request


def explain_request(prompt: str | None, options: ExplainOptions | None, args: InputArgs) -> pb.ExplainRequest:
    """The ExplainRequest for ``explain(prompt, options=..., **args)``."""
    unknown = set(args) - _keys(InputArgs)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    request = pb.ExplainRequest(model=args.get("model") or "", input=_input(prompt, args))
    request.options.CopyFrom(explain_options_to_proto(options or ExplainOptions()))
    return request


def compute_concept_request(
    concept: ConceptSpec | str, *, tokens_per_vector: int | None = None, model: str | None = None
) -> pb.ComputeConceptRequest:
    """The ComputeConceptRequest for ``compute_concept(concept, ...)``; a bare string is ConceptSpec(prompt=it)."""
    spec = ConceptSpec(concept) if isinstance(concept, str) else concept
    if not isinstance(spec, ConceptSpec):
        raise TypeError(f"concept must be a ConceptSpec or the concept prompt's text, not {type(concept).__name__}")
    request = pb.ComputeConceptRequest(model=model or "", concept=concept_spec_to_proto(spec))
    if tokens_per_vector is not None:
        request.tokens_per_vector = _unsigned("tokens_per_vector", tokens_per_vector)
    return request


__all__ = [
    "ChatMessage",
    "GenerateArgs",
    "InputArgs",
    "MessageLike",
    "build_input",
    "build_sampling",
    "compute_concept_request",
    "explain_request",
    "explain_stream_request",
    "generate_request",
    "generate_stream_request",
    "resolve_explain",
]
