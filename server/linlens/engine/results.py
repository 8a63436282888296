"""What an explanation pass takes and returns.

These dataclasses are the engine's public contract. They hold plain Python numbers and numpy arrays (never torch
tensors) so that the service can map them to protobuf messages, and notebooks can use them, without knowing how they
were computed. Arrays keep the precision the explanation ran in (float32 or float64).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating]


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
    BFLOAT16 = "bfloat16"  # accelerators only; the reconstruction is then only as good as bfloat16


class PositionSelection(str, enum.Enum):
    """Which input positions get a singular-value decomposition of their Jacobian J_i."""

    LAST = "last"
    ALL = "all"


@dataclass(frozen=True)
class AttributionTarget:
    """A direction in logit space to attribute: one token's logit, or the difference of two tokens' logits."""

    token_id: int
    contrast_token_id: int | None = None


@dataclass(frozen=True)
class ExplainOptions:
    """What one explanation pass computes. The defaults are what a user exploring one prediction wants."""

    #: How many singular components of each selected J_i to return; 0 skips the full Jacobian entirely
    #: (then only the attributions are computed: one vector-Jacobian product instead of d of them).
    top_k: int = 3
    #: How many tokens each singular vector is decoded to.
    tokens_per_vector: int = 8
    positions: PositionSelection = PositionSelection.LAST
    #: Extra attribution targets besides the explained token (which is always attributed first).
    targets: tuple[AttributionTarget, ...] = ()
    #: Return the per-token Jacobians J_i (n x d x d) themselves.
    include_jacobians: bool = False
    precision: Precision = Precision.FLOAT32
    #: Also compute the ordinary (not detached) Jacobian and report how badly it reconstructs y.
    ordinary_contrast: bool = False
    gate_mode: GateMode = GateMode.FREEZE_GATE
    #: The token to explain; None explains the model's own top prediction (argmax).
    explained_token_id: int | None = None
    #: Vector-Jacobian products per batch when materialising J; None picks one that bounds peak memory.
    vjp_chunk_size: int | None = None


@dataclass(frozen=True)
class TokenScore:
    """A vocabulary token with a score (a logit, a probability, or a cosine, depending on where it appears)."""

    token_id: int
    text: str
    score: float


@dataclass(frozen=True)
class PredictedToken:
    token_id: int
    text: str
    #: The raw logit w . y (before any final soft-capping the model applies).
    logit: float
    probability: float


@dataclass(frozen=True)
class Reconstruction:
    """How well y = sum_i J_i x_i (+ c) holds for the Jacobian that was returned."""

    #: ||sum_i J_i x_i + c - y|| / ||y|| with y from the model's own, unmodified forward pass.
    relative_error_vs_model: float
    #: The same against the detached pass's own output: a pure numerical-exactness check.
    relative_error_vs_detached: float
    #: max_v |W (sum_i J_i x_i + c) - W y|_v over the whole vocabulary, W the LM head.
    max_abs_logit_error: float
    #: Whether argmax W (sum_i J_i x_i + c) is the explained model's top token.
    predicts_same_token: bool
    linear_token_id: int


@dataclass(frozen=True)
class Attribution:
    """Exact split of a logit (or logit difference) over input tokens: sum(per_token) + constant == total."""

    target: AttributionTarget
    label: str
    #: a_i = w . J_i x_i for every input position i.
    per_token: FloatArray
    #: w . c, the part of the logit that comes from bias terms (0 for bias-free models).
    constant: float
    #: w . y from the model's own forward pass.
    total: float
    #: |sum(per_token) + constant - total| / |total|.
    completeness_error: float


@dataclass(frozen=True)
class SingularComponent:
    """One singular triple (s, u, v) of J_i, signs chosen so that u points along y."""

    rank: int
    value: float
    left: FloatArray
    right: FloatArray
    #: u decoded through the LM head: the tokens whose logits u raises most.
    left_tokens: tuple[TokenScore, ...]
    #: v decoded to the input-embedding rows nearest by cosine.
    right_tokens: tuple[TokenScore, ...]


@dataclass(frozen=True)
class PositionSpectrum:
    """The singular-value picture of one input position's Jacobian J_i."""

    position: int
    token_id: int
    token_text: str
    components: tuple[SingularComponent, ...]
    #: All singular values of J_i (descending), to plot the spectrum's decay.
    singular_values: FloatArray
    #: captured_share[k-1] = ||U_k^T J_i x_i||^2 / ||J_i x_i||^2: the share of this token's term in y that the
    #: rank-k truncation of J_i keeps, for k = 1..top_k.
    captured_share: tuple[float, ...]
    #: ||J_i||_F^2 / ||J_i||_2^2: the paper's "extremely low-dimensional" claim, as one number.
    stable_rank: float
    #: ||J_i x_i||: how much this token's term contributes to y in norm.
    term_norm: float


@dataclass(frozen=True)
class OrdinaryContrast:
    """The ordinary (not detached) Jacobian, for contrast: it does not reconstruct y."""

    relative_error_vs_model: float
    predicts_same_token: bool


@dataclass(frozen=True)
class Timings:
    """Seconds spent in each phase of one explanation."""

    forward: float = 0.0
    jacobian: float = 0.0
    attribution: float = 0.0
    svd: float = 0.0
    decode: float = 0.0
    ordinary: float = 0.0

    @property
    def total(self) -> float:
        return self.forward + self.jacobian + self.attribution + self.svd + self.decode + self.ordinary


@dataclass(frozen=True)
class Explanation:
    """The explanation of one next-token prediction."""

    input_ids: tuple[int, ...]
    input_tokens: tuple[str, ...]
    #: The model's own top prediction (argmax of its logits).
    predicted: PredictedToken
    #: The token that was explained (the prediction unless ExplainOptions.explained_token_id chose another).
    explained: PredictedToken
    #: The output embedding y: final hidden state, last position, after the final norm, before the LM head.
    y: FloatArray
    #: The affine constant c of y = sum_i J_i x_i + c (all zeros for bias-free models).
    constant: FloatArray
    has_bias: bool
    #: Present when the full Jacobian was computed (top_k > 0 or include_jacobians).
    reconstruction: Reconstruction | None
    #: attributions[0] is the explained token; then one per ExplainOptions.targets entry.
    attributions: tuple[Attribution, ...]
    spectra: tuple[PositionSpectrum, ...]
    #: ||sum_i J_i^(k) x_i + c - y|| / ||y|| for k = 1..top_k (rank-k truncation of every J_i at once).
    truncated_relative_error: tuple[float, ...]
    #: (n, d, d) when ExplainOptions.include_jacobians, else None. jacobians[i] = dy/dx_i.
    jacobians: FloatArray | None
    ordinary: OrdinaryContrast | None
    precision: Precision
    gate_mode: GateMode
    timings: Timings = field(default_factory=Timings)
    #: Number of vector-Jacobian products this explanation needed.
    vjp_count: int = 0


# -- Layer-by-layer analysis (the paper's second result) ----------------------------------------------------------


@dataclass(frozen=True)
class LayerOptions:
    """Which layers to look inside and what to compute for each. Layer indices count from 0."""

    #: The layers to analyse; None means every layer. (The per-layer attribution matrix always covers all layers.)
    layers: tuple[int, ...] | None = None
    #: Jacobian of the residual stream after layer l (last position) w.r.t. the input embeddings: its top singular
    #: vectors, decoded logit-lens style, show the prediction forming with depth. d VJPs per layer.
    up_to_layer: bool = True
    #: Jacobian of layer l's output (last position) w.r.t. its own input (the residual stream entering it). Shares
    #: the VJPs of up_to_layer when both are asked for.
    layer_alone: bool = False
    #: Singular vectors of each attention and MLP block's own linear map of the input embeddings. 2d VJPs per layer.
    component_spectra: bool = False
    top_k: int = 3
    tokens_per_vector: int = 8


@dataclass(frozen=True)
class LinearMapSpectrum:
    """The singular-value picture of one exact linear map z -> out, and how well that map reproduces out."""

    components: tuple[SingularComponent, ...]
    singular_values: FloatArray
    captured_share: tuple[float, ...]
    stable_rank: float
    term_norm: float
    #: ||sum_j M_j z_j - out|| / ||out|| over every input position j (for affine maps, the constant included).
    reconstruction_error: float


@dataclass(frozen=True)
class ComponentContribution:
    """What one attention or MLP block adds to the residual stream, as an exact part of y and of the logit."""

    layer: int
    #: "attention" or "mlp".
    component: str
    #: Its exact share of the explained token's logit: w . (g * term), g the final norm's frozen scale.
    logit: float
    #: That share split over input tokens (sums to ``logit - constant``).
    per_token: FloatArray
    #: The part of ``logit`` that comes from bias terms (0 for bias-free models).
    constant: float
    #: ||g * term||: the size of its contribution to y.
    y_norm: float
    #: (g * term) . y / ||y||^2: the share of y along y that this block writes.
    y_share: float
    spectrum: LinearMapSpectrum | None = None


@dataclass(frozen=True)
class LayerAttributions:
    """The layers x tokens attribution matrix of the explained logit (one batched VJP with a seed per block)."""

    explained: PredictedToken
    input_tokens: tuple[str, ...]
    #: attention[l, i] + mlp[l, i] = per_layer[l, i]: the exact contribution of input token i, through layer l's
    #: attention and MLP, to the explained logit.
    attention: FloatArray
    mlp: FloatArray
    per_layer: FloatArray
    #: The embeddings' direct path (only the last token's embedding reaches y without passing a block).
    direct: FloatArray
    #: Per-layer totals (bias constants included).
    attention_logits: FloatArray
    mlp_logits: FloatArray
    #: The explained logit w . y from the model's own forward pass.
    logit: float
    #: |direct.sum() + attention_logits.sum() + mlp_logits.sum() - w . y| / |w . y|, y from the detached pass (the
    #: split is exact to the precision of the explanation; ``logit`` itself comes from the served model).
    completeness_error: float
    #: ||g * (x_last + sum of all block terms) - y|| / ||y||: the residual decomposition of y is exact.
    decomposition_error: float


@dataclass(frozen=True)
class LayerResult:
    """Everything computed for one layer."""

    layer: int
    #: J of the residual after this layer (last position) w.r.t. the last input embedding, decoded logit-lens style;
    #: its reconstruction error covers every input position.
    up_to_layer: LinearMapSpectrum | None
    #: J of this layer's output (last position) w.r.t. its own input at the last position; reconstruction over all.
    layer_alone: LinearMapSpectrum | None
    attention: ComponentContribution
    mlp: ComponentContribution
    seconds: float = 0.0
    vjp_count: int = 0
