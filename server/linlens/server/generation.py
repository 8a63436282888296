"""Text generation with a transformers causal LM: greedy or sampled, streamed token by token, stoppable.

Generation goes through ``model.generate(do_sample=False)`` itself, so greedy output is transformers' own greedy
output by construction (not a re-implementation that could drift). Two hooks are passed in:

- a logits processor, which records the model's log-probabilities at each step (for the per-token logprob) and, when
  sampling, draws the token itself from a per-request ``torch.Generator`` and hands generate a distribution with all
  mass on that token. transformers would otherwise sample with the *global* torch RNG, which concurrent requests
  share, so a seed could not make a sampled generation repeatable;
- a stopping criterion, called after each token is appended, which reports the token to the caller at once (the
  stream), checks stop sequences, and stops generation when the request was cancelled or its deadline passed.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from linlens.contract import FinishReason, GeneratedToken
from linlens.server.batching import BatchRow, DecodeBatch, processors_for
from linlens.server.inputs import InputError
from linlens.server.scheduler import StopReason

#: max_new_tokens when a request leaves it unset.
DEFAULT_MAX_NEW_TOKENS = 16
#: Smallest positive sampling temperature. Logits divided by less overflow (float16 already at about 1e-4 with
#: logits of 30; float32 at 1e-37), and sampling from infinities fails; below this, sampling is greedy decoding
#: anyway, which temperature 0 asks for exactly.
MIN_TEMPERATURE = 0.01


class GenerationStopped(Exception):
    """Generation stopped early because the caller cancelled or its deadline passed."""

    def __init__(self, reason: StopReason, tokens: Sequence[GeneratedToken]) -> None:
        super().__init__(f"generation stopped after {len(tokens)} token(s): {reason.value}")
        self.reason = reason
        self.tokens = tuple(tokens)


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen. temperature 0 is greedy decoding; top_p, top_k and seed then do nothing."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, max_new_tokens_limit: int) -> Sampling:
        """Raise InputError for an out-of-range parameter, naming it and the accepted range."""
        if self.max_new_tokens < 1:
            raise InputError("sampling.max_new_tokens must be at least 1 (leave it unset for the default)")
        if self.max_new_tokens > max_new_tokens_limit:
            raise InputError(
                f"sampling.max_new_tokens is {self.max_new_tokens}, above this server's limit of "
                f"{max_new_tokens_limit} (max_new_tokens); ask for fewer tokens"
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"sampling.temperature must be 0 (greedy) or positive, got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise InputError(
                f"sampling.temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {self.temperature}: "
                "below that the sampling is greedy decoding with overflowing logits; use 0"
            )
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InputError(f"sampling.top_p must lie in (0, 1] (0 or 1 turn it off), got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"sampling.top_k must be 0 (off) or positive, got {self.top_k}")
        if any(s == "" for s in self.stop_sequences):
            raise InputError("sampling.stop_sequences contains an empty string; remove it")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InputError("sampling.seed must fit in an unsigned 64-bit integer")
        return self


@dataclass(frozen=True)
class GenerationRun:
    """What one run of the model's ``generate`` produced (the service adds explanations and timings)."""

    prompt_ids: tuple[int, ...]
    tokens: tuple[GeneratedToken, ...]
    #: The generated text, cut before the first stop sequence.
    text: str
    finish_reason: FinishReason
    #: Seconds of generation (all forward passes and sampling).
    seconds: float
    #: Seconds from the start of generation to the first token, or None when no token was produced.
    first_token_seconds: float | None
    #: The seed a sampled generation used (drawn at random when the request gave none), so it can be repeated.
    seed: int | None = None

    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(t.token_id for t in self.tokens)


# --- generation ------------------------------------------------------------------------------------------------------


class _StepLogits(LogitsProcessor):
    """Records each step's log-probabilities and, when sampling, picks the token with a private generator."""

    def __init__(self, sampling: Sampling, generator: torch.Generator | None) -> None:
        self.sampling = sampling
        self.generator = generator
        self.logprobs: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.logprobs = torch.log_softmax(scores[0].float(), dim=-1)
        if self.sampling.greedy:
            return scores
        token = sample_token(scores[0].float(), self.sampling, self.generator)
        chosen = torch.full_like(scores, -math.inf)
        chosen[0, token] = 0.0
        return chosen  # type: ignore[return-value]


def sample_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Temperature, then top-k, then top-p (nucleus), then one draw: the usual order, as in most servers."""
    scores = logits / sampling.temperature
    if 0 < sampling.top_k < scores.numel():
        kth = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # drop a token when the tokens before it already reach top_p; the most likely token always stays
        before = torch.cumsum(probs, dim=-1) - probs
        drop = before >= sampling.top_p
        drop[0] = False
        scores = scores.scatter(0, order[drop], -math.inf)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


class _TokenHook(StoppingCriteria):
    """Runs after every generated token: record it, hand it on, and decide whether to stop."""

    def __init__(
        self,
        tokenizer: Any,
        step_logits: _StepLogits,
        stop_sequences: tuple[str, ...],
        should_stop: Callable[[], bool],
        on_token: Callable[[GeneratedToken], None] | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.step_logits = step_logits
        self.stop_sequences = stop_sequences
        self.should_stop = should_stop
        self.on_token = on_token
        self.ids: list[int] = []
        self.tokens: list[GeneratedToken] = []
        self.text = ""
        self.stop_at: int | None = None  # where the first stop sequence starts in self.text
        self.cancelled = False
        self.first_token_at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        token_id = int(input_ids[0, -1])
        self.ids.append(token_id)
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        logprobs = self.step_logits.logprobs
        logprob = float(logprobs[token_id]) if logprobs is not None else math.nan
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            piece = ""  # an incomplete UTF-8 character: its bytes arrive with a later token
        else:
            # decoding more tokens normally only appends; should a tokenizer rewrite the tail, send what changed
            piece = text[_common_prefix_length(self.text, text) :]
            self.text = text
        token = GeneratedToken(index=len(self.tokens), token_id=token_id, text=piece, logprob=logprob)
        self.tokens.append(token)
        if self.on_token is not None:
            self.on_token(token)
        stop = False
        if self.stop_sequences:
            hits = [i for i in (text.find(s) for s in self.stop_sequences) if i >= 0]
            if hits:
                self.stop_at = min(hits)
                stop = True
        if self.should_stop():
            self.cancelled = True
            stop = True
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool)  # type: ignore[return-value]


class RunControls(TypedDict, total=False):
    """How a generation is bounded, stopped and observed: the keyword arguments of generate and generate_batched."""

    #: The model's context length (None: unbounded); it caps the token budget (FinishReason.CONTEXT_LENGTH).
    max_positions: int | None
    #: Polled at every token: once true, generation ends after the current token and GenerationStopped is raised.
    should_stop: Callable[[], bool]
    #: The reason GenerationStopped carries (None: CANCELLED).
    stop_reason: Callable[[], StopReason | None]
    #: Called on the generating thread as soon as each token exists.
    on_token: Callable[[GeneratedToken], None] | None


@dataclass
class _Start:
    """What both decoding loops set up the same way before their first token."""

    prompt: list[int]
    budget: int
    capped_by_context: bool
    seed: int | None
    generator: torch.Generator | None
    step_logits: _StepLogits
    hook: _TokenHook
    config: GenerationConfig
    eos_ids: set[int]
    should_stop: Callable[[], bool]
    stop_reason: Callable[[], StopReason | None]


def _start(model: Any, tokenizer: Any, prompt_ids: Sequence[int], sampling: Sampling, controls: RunControls) -> _Start:
    should_stop = controls.get("should_stop") or (lambda: False)
    stop_reason = controls.get("stop_reason") or (lambda: None)
    prompt, budget, capped_by_context = _budget(prompt_ids, sampling, controls.get("max_positions"))
    seed, generator = _generator(model, sampling)
    step_logits = _StepLogits(sampling, generator)
    hook = _TokenHook(tokenizer, step_logits, sampling.stop_sequences, should_stop, controls.get("on_token"))
    if should_stop():
        raise GenerationStopped(stop_reason() or StopReason.CANCELLED, [])
    config, eos_ids = _generation_config(model, tokenizer, sampling, budget)
    return _Start(
        prompt, budget, capped_by_context, seed, generator, step_logits, hook, config, eos_ids, should_stop, stop_reason
    )


def generate(
    model: Any, tokenizer: Any, prompt_ids: Sequence[int], sampling: Sampling, **controls: Unpack[RunControls]
) -> GenerationRun:
    """Generate up to ``sampling.max_new_tokens`` tokens after ``prompt_ids`` (``controls``: see RunControls).

    ``on_token`` is called on the generating thread as soon as each token exists. When ``should_stop`` turns true,
    generation ends after the current token and GenerationStopped(reason from ``stop_reason``) is raised.
    """
    start = _start(model, tokenizer, prompt_ids, sampling, controls)
    prompt, budget, capped_by_context, seed = start.prompt, start.budget, start.capped_by_context, start.seed
    step_logits, hook, config, eos_ids = start.step_logits, start.hook, start.config, start.eos_ids
    stop_reason = start.stop_reason

    input_ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
    started = time.monotonic()
    model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        generation_config=config,
        logits_processor=LogitsProcessorList([step_logits]),
        stopping_criteria=StoppingCriteriaList([hook]),
    )
    seconds = time.monotonic() - started
    step_logits.logprobs = None

    if hook.cancelled:
        raise GenerationStopped(stop_reason() or StopReason.CANCELLED, hook.tokens)
    return _finished(tokenizer, prompt, hook, sampling, eos_ids, budget, capped_by_context, started, seconds, seed)


def generate_batched(
    batch: DecodeBatch,
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    sampling: Sampling,
    **controls: Unpack[RunControls],
) -> GenerationRun:
    """Like :func:`generate`, but decoded in ``batch`` together with the model's other requests
    (:mod:`linlens.server.batching`). The tokens are chosen exactly as generate chooses them: the generation config's
    logits processors on the request's own ids, then argmax, or a draw from the request's own generator."""
    start = _start(model, tokenizer, prompt_ids, sampling, controls)
    prompt, budget, capped_by_context, seed = start.prompt, start.budget, start.capped_by_context, start.seed
    step_logits, hook, config, eos_ids = start.step_logits, start.hook, start.config, start.eos_ids
    generator, should_stop, stop_reason = start.generator, start.should_stop, start.stop_reason
    stop_ids = set() if sampling.ignore_eos else eos_ids
    processors = processors_for(model, config, len(prompt))
    device = model.device
    completed = False

    def step(logits: torch.Tensor) -> tuple[int, bool]:
        nonlocal completed
        scores = logits
        if processors:
            ids = torch.tensor([prompt + hook.ids], dtype=torch.long, device=device)
            scores = processors(ids, logits[None])[0]  # type: ignore[arg-type]
        step_logits.logprobs = torch.log_softmax(scores, dim=-1)
        token = int(torch.argmax(scores)) if sampling.greedy else sample_token(scores, sampling, generator)
        stop = bool(hook(torch.tensor([[token]]), scores[None])[0])  # type: ignore[arg-type]
        finished = stop or token in stop_ids or len(hook.ids) >= budget
        completed = finished and not hook.cancelled
        return token, finished

    started = time.monotonic()
    cost = len(prompt) + budget
    batch.run(BatchRow(prompt, step, should_stop, cost))
    seconds = time.monotonic() - started
    step_logits.logprobs = None
    if not completed:
        raise GenerationStopped(stop_reason() or StopReason.CANCELLED, hook.tokens)
    return _finished(tokenizer, prompt, hook, sampling, eos_ids, budget, capped_by_context, started, seconds, seed)


def _budget(prompt_ids: Sequence[int], sampling: Sampling, max_positions: int | None) -> tuple[list[int], int, bool]:
    """The prompt as ints, the token budget, and whether the model's context capped it."""
    prompt = [int(i) for i in prompt_ids]
    budget = sampling.max_new_tokens
    capped_by_context = False
    if max_positions:
        room = max_positions - len(prompt)
        if room < 1:
            raise InputError(
                f"the input has {len(prompt)} tokens, which fills the model's context of {max_positions}; shorten it"
            )
        if room < budget:
            budget, capped_by_context = room, True
    return prompt, budget, capped_by_context


def _generator(model: Any, sampling: Sampling) -> tuple[int | None, torch.Generator | None]:
    """The seed and the request's own generator when sampling (a random seed when the request gave none)."""
    if sampling.greedy:
        return None, None
    seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
    generator = torch.Generator(device=model.device)
    generator.manual_seed(seed)
    return seed, generator


def _generation_config(
    model: Any, tokenizer: Any, sampling: Sampling, budget: int
) -> tuple[GenerationConfig, set[int]]:
    """The model's generation config for one greedy run of ``budget`` tokens, and its EOS ids."""
    config = GenerationConfig.from_dict(model.generation_config.to_dict())
    config.do_sample = False  # greedy argmax over what _StepLogits returns: the draw happened there when sampling
    config.max_new_tokens = budget
    config.min_new_tokens = None
    config.max_length = None
    config.num_beams = 1
    for name in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
        setattr(config, name, None)  # never applied with do_sample=False; unset so transformers does not warn
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _first(eos, 0)
    eos_ids = set(_as_list(eos))
    if sampling.ignore_eos:
        config.eos_token_id = []  # None would be refilled from the model's defaults inside generate
    return config, eos_ids


def _finished(
    tokenizer: Any,
    prompt: list[int],
    hook: _TokenHook,
    sampling: Sampling,
    eos_ids: set[int],
    budget: int,
    capped_by_context: bool,
    started: float,
    seconds: float,
    seed: int | None,
) -> GenerationRun:
    text = tokenizer.decode(hook.ids, skip_special_tokens=True)
    if hook.stop_at is not None:
        reason, text = FinishReason.STOP_SEQUENCE, text[: hook.stop_at]
    elif hook.ids and hook.ids[-1] in eos_ids and not sampling.ignore_eos:
        reason = FinishReason.EOS
    elif capped_by_context and len(hook.ids) >= budget:
        reason = FinishReason.CONTEXT_LENGTH
    else:
        reason = FinishReason.LENGTH
    first = None if hook.first_token_at is None else hook.first_token_at - started
    return GenerationRun(
        prompt_ids=tuple(prompt),
        tokens=tuple(hook.tokens),
        text=text,
        finish_reason=reason,
        seconds=seconds,
        first_token_seconds=first,
        seed=seed,
    )


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(value)]


def _first(value: Any, default: int) -> int:
    items = _as_list(value)
    return items[0] if items else default


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "GenerationRun",
    "GenerationStopped",
    "RunControls",
    "Sampling",
    "generate",
    "generate_batched",
    "sample_token",
]
