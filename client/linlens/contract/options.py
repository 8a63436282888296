"""What an explanation request asks for: the options, their defaults, and the rules every value must follow.

This is the one home of each option, default and rule. The SDK builds requests from these dataclasses, the server
builds the same dataclasses from the protobuf it receives (``linlens.contract.wire``), and the engine runs them, so
a default such as ``top_k = 3`` or a rule such as "``every`` and explicit ``layers`` exclude each other" is written
once. Rules come in three kinds, each with one home:

- *structural* rules that need nothing but the value (``top_k >= 0``) live in ``__post_init__`` here, so the SDK
  reports them before sending and the server applies the very same code to what it receives;
- rules that need the model (a layer index below ``num_layers``, a token id inside the vocabulary) live here too
  when they are pure arithmetic on a model dimension (:meth:`LayerAnalysisOptions.selected`), else in the engine;
- a server's own limits (``max_top_k``, ...) live in ``linlens.server.admission``.

A broken rule raises :class:`OptionError`, whose ``field`` names the option as the protobuf does, so that the server
can answer INVALID_ARGUMENT with the path the caller wrote (``explain.layers.every``). Nothing here imports torch.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt

T = TypeVar("T")


def flag(default: T, help: str, **cli: str) -> T:
    """A field's default and the help of its command-line flag: ``linlens.cli.flags`` builds the flag from the field
    (``--field-name``, or ``cli["flag"]``), so the CLI restates neither. ``cli["spell"] == "dashes"`` spells an
    enum's values with dashes on the command line (``matrix-free``)."""
    return field(default=default, metadata={"help": help, **cli})


#: The model a server serves, and a command runs in-process, when none is named: its one home.
DEFAULT_MODEL = "smollm2-135m"


class OptionError(ValueError):
    """An option value breaks a rule. ``field`` is its dotted name below ExplainOptions, e.g. ``layers.every``."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem

    def under(self, prefix: str) -> OptionError:
        """The same error named from an enclosing message, e.g. ``explain.top_k`` for a request's ``explain``."""
        return OptionError(f"{prefix}.{self.field}", self.problem)


class GateMode(str, enum.Enum):
    """Which factor of a gated MLP (SwiGLU, GeGLU) carries the linear path.

    Both choices leave the forward value unchanged and both make the network exactly linear in its input embeddings.
    """

    #: The paper's default: the activated gate act(gate_proj(x)) is a frozen coefficient, up_proj(x) stays linear.
    FREEZE_GATE = "freeze_gate"
    #: The alternative: up_proj(x) is frozen, and act(g) = g * s(g) keeps g linear with s(g) frozen.
    FREEZE_UP = "freeze_up"


class Precision(str, enum.Enum):
    """Floating-point type the explanation pass computes in."""

    FLOAT32 = "float32"
    FLOAT64 = "float64"
    #: Accelerators only; the reconstruction is then only as good as bfloat16.
    BFLOAT16 = "bfloat16"


class PositionSelection(str, enum.Enum):
    """Which input positions get a singular-value decomposition of their Jacobian J_i."""

    LAST = "last"
    ALL = "all"
    #: The positions in ``ExplainOptions.position_indices``.
    LIST = "list"


class ExplainMethod(str, enum.Enum):
    """How singular triplets are computed."""

    #: The cheaper of the two for the request, by the number of products each needs (full for raw Jacobians).
    AUTO = "auto"
    #: Materialise each Jacobian (hidden_size VJPs per map) and take its full SVD.
    FULL = "full"
    #: Block Krylov on products only: the top_k triplets with residual certificates, a few dozen products per map.
    MATRIX_FREE = "matrix_free"


@dataclass(frozen=True)
class AttributionTarget:
    """A direction in logit space to attribute: one token's logit, or the difference of two tokens' logits."""

    token_id: int
    contrast_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.token_id < 0:
            raise OptionError("token_id", f"must be a token id (>= 0), got {self.token_id}")
        if self.contrast_token_id is not None and self.contrast_token_id < 0:
            raise OptionError("contrast_token_id", f"must be a token id (>= 0), got {self.contrast_token_id}")


#: What ``ExplainOptions.targets`` accepts per entry: a target, a bare token id, or (token_id, contrast_token_id).
TargetLike: TypeAlias = AttributionTarget | int | tuple[int, int | None]
#: Which generation steps to explain: "first" (step 0), "all", or explicit step indices (0 = first token).
StepSelection: TypeAlias = Literal["first", "all"] | Sequence[int]
#: Which layers to analyse: "all" or explicit 0-based indices.
LayerSelection: TypeAlias = Literal["all"] | Sequence[int]


def _indices(field: str, values: object, what: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise OptionError(field, f"must be 'all'/'first' or a sequence of {what} indices, not {values!r}")
    indices = tuple(int(i) for i in values)
    if not indices:
        raise OptionError(field, f"is empty: name at least one {what}")
    negative = [i for i in indices if i < 0]
    if negative:
        raise OptionError(field, f"holds negative {what} indices {negative[:5]}")
    if len(set(indices)) != len(indices):
        raise OptionError(field, f"names a {what} more than once; list each {what} once")
    return indices


def _at_least(field: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        raise OptionError(field, f"must be at least {minimum}, got {value}")


@dataclass(frozen=True)
class LayerAnalysisOptions:
    """Look inside the model, layer by layer (``ExplainOptions(layers=...)``).

    The layers x tokens attribution matrix always covers every layer and is cheap (one batched VJP with a seed per
    attention and MLP block). Per selected layer, ``up_to_layer`` / ``layer_alone`` cost hidden_size VJPs (shared),
    ``component_spectra`` 2 x hidden_size: select few layers when you ask for those on a CPU.
    """

    #: "all" or explicit 0-based layer indices (results come in this order); normalised to "all" or a tuple.
    layers: LayerSelection = "all"
    #: Every k-th layer instead (0, k, 2k, ... plus the last layer); only with ``layers="all"``.
    every: int | None = None
    #: Residual stream after each selected layer as a map of the input embeddings, decoded logit-lens style.
    up_to_layer: bool = True
    #: Each selected layer's own map of its input (shares the VJPs of up_to_layer).
    layer_alone: bool = False
    #: Spectra of each selected layer's attention and MLP blocks (their logit shares come regardless).
    component_spectra: bool = False
    #: Singular components per map; 0 returns only the spectrum summaries.
    top_k: int = 3
    #: Tokens each singular vector is decoded to.
    tokens_per_vector: int = 8

    def __post_init__(self) -> None:
        if self.layers != "all":
            object.__setattr__(self, "layers", _indices("layers", self.layers, "layer"))
        _at_least("every", self.every, 1)
        if self.every is not None and self.layers != "all":
            raise OptionError("every", "cannot be combined with explicit layers; give one or the other")
        _at_least("top_k", self.top_k, 0)
        _at_least("tokens_per_vector", self.tokens_per_vector, 1)

    @classmethod
    def parse(cls, spec: str, **kwargs: Any) -> LayerAnalysisOptions:
        """From the CLI's spelling: "all", "every:K" or comma-separated indices such as "0,5,10"."""
        text = spec.strip()
        if text == "all":
            return cls(**kwargs)
        if text.startswith("every:"):
            try:
                every = int(text.removeprefix("every:"))
            except ValueError:
                raise OptionError("layers", f"{spec!r}: every:K needs an integer K") from None
            return cls(every=every, **kwargs)
        try:
            indices = tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise OptionError("layers", f"{spec!r}: use all, every:K or comma-separated layer indices") from None
        return cls(layers=indices, **kwargs)

    def selected(self, num_layers: int) -> tuple[int, ...]:
        """The layers analysed in a model with ``num_layers`` layers, in result order."""
        if self.layers != "all":
            indices = tuple(self.layers)
            missing = [i for i in indices if i >= num_layers]
            if missing:
                raise OptionError(
                    "layers", f"names layer(s) {missing[:5]}, but the model has layers 0..{num_layers - 1}"
                )
            return indices
        if self.every is not None:
            return tuple(sorted(set(range(0, num_layers, self.every)) | {num_layers - 1}))
        return tuple(range(num_layers))

    @property
    def needs_jacobians(self) -> bool:
        """Whether any selected layer gets a Jacobian (what costs hidden_size VJPs or more per layer)."""
        return self.up_to_layer or self.layer_alone or self.component_spectra

    def vjps_per_layer(self, hidden_size: int) -> int:
        """Vector-Jacobian products each selected layer costs."""
        maps = hidden_size if self.up_to_layer or self.layer_alone else 0
        return maps + (2 * hidden_size if self.component_spectra else 0)


@dataclass(frozen=True)
class ExplainOptions:
    """What one explanation computes. The defaults are what a user exploring one prediction wants.

    ``targets`` accepts AttributionTarget, a bare token id, or a (token_id, contrast_token_id) pair; ``steps``
    accepts "first", "all" or any sequence of step indices. Both are normalised to tuples.
    """

    #: Generation steps to explain (Generate and GenerateStream; Explain always explains its one prediction).
    steps: StepSelection = "first"
    #: Singular components per selected position; 0 skips the full Jacobian (attributions only: one VJP, fast).
    top_k: int = flag(3, "singular components per position (0: attributions only)")
    #: Tokens each singular vector is decoded to.
    tokens_per_vector: int = flag(8, "tokens each singular vector decodes to")
    positions: PositionSelection = PositionSelection.LAST
    #: Extra attribution targets besides the explained token, which is always attributed first.
    targets: Sequence[TargetLike] = ()
    #: Return the (n, d, d) Jacobians J_i themselves (large).
    include_jacobians: bool = flag(False, "return the per-token Jacobians")
    precision: Precision = flag(Precision.FLOAT32, "floating-point type the explanation pass computes in")
    #: Also compute the ordinary (not detached) Jacobian and report how badly it reconstructs y.
    ordinary_contrast: bool = flag(False, "contrast with the ordinary (not detached) Jacobian", flag="--ordinary")
    gate_mode: GateMode = flag(
        GateMode.FREEZE_GATE, "which factor of a gated MLP (SwiGLU, GeGLU) carries the linear path"
    )
    #: Explain only: the token to explain instead of the model's top prediction (None: the prediction).
    explained_token_id: int | None = None
    #: Vector-Jacobian products per batch while materialising J; None lets the engine bound peak memory.
    vjp_chunk_size: int | None = None
    #: Layer-by-layer analysis of every explained step; None skips it.
    layers: LayerAnalysisOptions | None = None
    #: How singular triplets are computed (per-position spectra, the prompt spectrum, the layer maps).
    method: ExplainMethod = flag(
        ExplainMethod.AUTO,
        "how the singular triplets are computed (auto: the cheaper of full and matrix-free)",
        spell="dashes",
    )
    #: The positions to decompose with ``positions=LIST`` (0-based); normalised to a tuple.
    position_indices: Sequence[int] = ()
    #: Also the top_k triplets of the whole-prompt map [J_1 ... J_n].
    prompt_spectrum: bool = flag(False, "also the whole-prompt map [J_1 ... J_n]")
    #: Decoded singular vectors skip the tokenizer's special tokens (end of text, chat markers), which otherwise can
    #: crowd the lists of a chat model; only the token lists change.
    skip_special_tokens: bool = flag(False, "decoded singular vectors skip special tokens (end of text, chat markers)")

    def __post_init__(self) -> None:
        if self.steps not in ("first", "all"):
            object.__setattr__(self, "steps", _indices("step_indices", self.steps, "step"))
        targets: object = self.targets
        if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence):
            raise OptionError("targets", f"must be a sequence of attribution targets, not {targets!r}")
        object.__setattr__(self, "targets", tuple(_target(t, i) for i, t in enumerate(targets)))
        enums = (
            ("positions", PositionSelection),
            ("precision", Precision),
            ("gate_mode", GateMode),
            ("method", ExplainMethod),
        )
        for name, kind in enums:
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                known = ", ".join(m.value for m in kind)
                raise OptionError(name, f"must be one of {known}, not {getattr(self, name)!r}") from None
        if self.layers is not None and not isinstance(self.layers, LayerAnalysisOptions):
            raise OptionError("layers", f"must be LayerAnalysisOptions or None, not {type(self.layers).__name__}")
        _at_least("top_k", self.top_k, 0)
        _at_least("tokens_per_vector", self.tokens_per_vector, 1)
        _at_least("vjp_chunk_size", self.vjp_chunk_size, 1)
        if self.positions is PositionSelection.LIST:
            indices = _indices("position_indices", self.position_indices, "position")
            object.__setattr__(self, "position_indices", indices)
        elif self.position_indices:
            raise OptionError("position_indices", "needs positions LIST (it lists the positions to decompose)")
        else:
            object.__setattr__(self, "position_indices", ())
        if self.explained_token_id is not None and self.explained_token_id < 0:
            raise OptionError("explained_token_id", f"must be a token id (>= 0), got {self.explained_token_id}")

    @property
    def attribution_targets(self) -> tuple[AttributionTarget, ...]:
        """``targets`` as AttributionTarget objects (what __post_init__ normalised them to)."""
        return tuple(_target(t, i) for i, t in enumerate(self.targets))

    def selected_positions(self, n_tokens: int) -> tuple[int, ...]:
        """The input positions whose J_i get a spectrum, for an input of ``n_tokens`` tokens (none when top_k is 0)."""
        if self.top_k == 0:
            return ()
        if self.positions is PositionSelection.ALL:
            return tuple(range(n_tokens))
        if self.positions is PositionSelection.LAST:
            return (n_tokens - 1,)
        outside = [i for i in self.position_indices if i >= n_tokens]
        if outside:
            raise OptionError(
                "position_indices", f"names position(s) {outside[:5]}, but the input has positions 0..{n_tokens - 1}"
            )
        return tuple(self.position_indices)

    def explained_steps(self, max_new_tokens: int) -> tuple[int, ...] | None:
        """The steps a generation of at most ``max_new_tokens`` tokens explains; None means every step it makes.

        A step that ``max_new_tokens`` can never reach is an error rather than a silently empty answer.
        """
        if self.steps == "first":
            return (0,)
        if self.steps == "all":
            return None
        steps = tuple(sorted(self.steps))
        unreachable = [s for s in steps if s >= max_new_tokens]
        if unreachable:
            raise OptionError(
                "step_indices",
                f"names step(s) {unreachable[:5]}, but a generation of max_new_tokens {max_new_tokens} has steps "
                f"0..{max_new_tokens - 1}; ask for more tokens or fewer steps",
            )
        return steps


def _target(target: TargetLike, index: int) -> AttributionTarget:
    """One ``targets`` entry as an AttributionTarget; errors name it, e.g. ``targets[2].token_id``."""
    try:
        if isinstance(target, AttributionTarget):
            return target
        if isinstance(target, int) and not isinstance(target, bool):
            return AttributionTarget(target)
        if isinstance(target, tuple) and len(target) == 2:
            return AttributionTarget(int(target[0]), None if target[1] is None else int(target[1]))
    except OptionError as error:
        raise error.under(f"targets[{index}]") from None
    raise OptionError(f"targets[{index}]", f"cannot be used as an attribution target: {target!r}")


# ----------------------------------------------------------------------------------------------------------------
# Steering
# ----------------------------------------------------------------------------------------------------------------


class ConceptMap(str, enum.Enum):
    """The linear map whose singular vector becomes a concept vector."""

    #: The whole model's detached Jacobian J of the concept prompt's last position (what Explain decomposes).
    OUTPUT = "output"
    #: The up-to-layer map of a layer (residual stream after it, last position): its left vectors live where steering
    #: adds them.
    LAYER = "layer"


class SingularSide(str, enum.Enum):
    """Which vector of a singular triplet (s, u, v)."""

    #: u, signed to point along the map's output, decoded through the LM head.
    LEFT = "left"
    #: v (flipped with u), decoded to the nearest input embeddings.
    RIGHT = "right"


class SteeringPositions(str, enum.Enum):
    """The positions whose hidden states are steered."""

    #: The prompt's positions only (generated tokens still attend to the steered prompt).
    PROMPT = "prompt"
    #: The positions that predict generated tokens: the prompt's last position and every generated token.
    GENERATED = "generated"
    #: Every position.
    ALL = "all"


#: lambda when a request leaves it unset: the added vector's norm is strength / 2 times ||h_i|| (measured on
#: SmolLM2 in docs/steering.md).
DEFAULT_STEERING_STRENGTH = 0.5


def default_steering_layer(num_layers: int) -> int:
    """The layer steered when a request names none: floor(2 L / 3), "a layer near two thirds of the depth" (the
    paper's choice: late enough that the residual stream carries concepts, early enough to shape the prediction)."""
    return (2 * num_layers) // 3


def _enum(field: str, kind: type[enum.Enum], value: object) -> Any:
    try:
        return kind(value)
    except ValueError:
        known = ", ".join(str(m.value) for m in kind)
        raise OptionError(field, f"must be one of {known}, not {value!r}") from None


@dataclass(frozen=True)
class ConceptSpec:
    """How to compute a concept vector: a concept prompt and one singular vector of one of its detached maps.

    ``prompt`` is text or token ids (the concept prompt's last position is decomposed). ``layer`` is the layer of a
    ``ConceptMap.LAYER`` map; None means the steering layer (``Steering.layer``) when the spec steers, and
    :func:`default_steering_layer` in ``compute_concept``. ``rank`` is 1-based.
    """

    prompt: str | Sequence[int]
    map: ConceptMap = ConceptMap.OUTPUT
    layer: int | None = None
    rank: int = 1
    side: SingularSide = SingularSide.LEFT

    def __post_init__(self) -> None:
        if isinstance(self.prompt, str):
            if not self.prompt:
                raise OptionError("prompt", "is empty: give the concept prompt's text or token ids")
        elif isinstance(self.prompt, bytes) or not isinstance(self.prompt, Sequence):
            raise OptionError("prompt", f"must be text or a sequence of token ids, not {type(self.prompt).__name__}")
        else:
            ids = tuple(int(i) for i in self.prompt)
            if not ids:
                raise OptionError("prompt", "is empty: give the concept prompt's text or token ids")
            negative = [i for i in ids if i < 0]
            if negative:
                raise OptionError("prompt", f"holds negative token ids {negative[:5]}")
            object.__setattr__(self, "prompt", ids)
        object.__setattr__(self, "map", _enum("map", ConceptMap, self.map))
        object.__setattr__(self, "side", _enum("side", SingularSide, self.side))
        _at_least("layer", self.layer, 0)
        _at_least("rank", self.rank, 1)

    def resolved_layer(self, num_layers: int, steering_layer: int | None = None) -> int | None:
        """The layer of a LAYER map in a model of ``num_layers`` layers (None for the OUTPUT map); OptionError when
        it does not exist. ``steering_layer`` is the layer the vector will steer, when it steers."""
        if self.map is ConceptMap.OUTPUT:
            return None
        layer = self.layer if self.layer is not None else steering_layer
        layer = layer if layer is not None else default_steering_layer(num_layers)
        if layer >= num_layers:
            raise OptionError("layer", f"is {layer}, but the model has layers 0..{num_layers - 1}")
        return layer


@dataclass(frozen=True, eq=False)
class Steering:
    """Steer a generation toward a concept: h_i <- h_i + strength * a * ||h_i|| / (2 ||a||) at the output of decoder
    layer ``layer``, for the selected ``positions`` (arXiv 2505.24293).

    Give exactly one of ``concept`` (computed on the server before generating: one explanation) or ``vector`` (e.g. a
    cached ``ConceptVector.vector``). ``layer`` None means :func:`default_steering_layer`. A strength of 0 steers
    nothing; a negative one steers away from the concept.
    """

    concept: ConceptSpec | None = None
    vector: npt.ArrayLike | None = None
    layer: int | None = None
    strength: float = DEFAULT_STEERING_STRENGTH
    positions: SteeringPositions = SteeringPositions.ALL

    def __post_init__(self) -> None:
        if (self.concept is None) == (self.vector is None):
            raise OptionError("concept", "and vector: give exactly one (a concept prompt or a concept vector)")
        if self.concept is not None and not isinstance(self.concept, ConceptSpec):
            raise OptionError("concept", f"must be a ConceptSpec, not {type(self.concept).__name__}")
        if self.vector is not None:
            try:
                vector = np.array(self.vector, dtype=np.float32)
            except (TypeError, ValueError):
                raise OptionError("vector", "must be a 1-D array of floats") from None
            if vector.ndim != 1 or vector.size == 0:
                raise OptionError("vector", f"must be a non-empty 1-D array, got shape {tuple(vector.shape)}")
            if not np.isfinite(vector).all():
                raise OptionError("vector", "holds NaN or infinite values")
            if not np.any(vector):
                raise OptionError("vector", "is all zeros: it has no direction to steer toward")
            vector.flags.writeable = False
            object.__setattr__(self, "vector", vector)
        _at_least("layer", self.layer, 0)
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)):
            raise OptionError("strength", f"must be a number, not {type(self.strength).__name__}")
        if not math.isfinite(self.strength):
            raise OptionError("strength", f"must be finite, got {self.strength}")
        object.__setattr__(self, "strength", float(self.strength))
        object.__setattr__(self, "positions", _enum("positions", SteeringPositions, self.positions))

    def resolved_layer(self, num_layers: int) -> int:
        """The steered layer in a model of ``num_layers`` layers; OptionError when it does not exist."""
        layer = self.layer if self.layer is not None else default_steering_layer(num_layers)
        if layer >= num_layers:
            raise OptionError("layer", f"is {layer}, but the model has layers 0..{num_layers - 1}")
        return layer

    def check_vector(self, hidden_size: int) -> None:
        """OptionError when a given vector does not have the model's hidden size."""
        if self.vector is not None and np.asarray(self.vector).size != hidden_size:
            raise OptionError(
                "vector", f"has {np.asarray(self.vector).size} values, but the model's hidden size is {hidden_size}"
            )


__all__ = [
    "DEFAULT_STEERING_STRENGTH",
    "AttributionTarget",
    "ConceptMap",
    "ConceptSpec",
    "ExplainMethod",
    "ExplainOptions",
    "GateMode",
    "LayerAnalysisOptions",
    "LayerSelection",
    "OptionError",
    "PositionSelection",
    "Precision",
    "SingularSide",
    "Steering",
    "SteeringPositions",
    "StepSelection",
    "TargetLike",
    "default_steering_layer",
]
