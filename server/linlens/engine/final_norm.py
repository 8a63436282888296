"""The final norm of one prediction with its coefficient frozen: the affine map from the residual stream to y.

The layer analysis pushes every residual-stream term through it. With the coefficient (1/rms, or 1/std) held at the
value the explanation's own pass froze, the final norm at the last position is

    y = g * (C h) + b        g = coefficient * weight (Gemma: * (1 + weight)),

where C is the identity for RMSNorm and the mean subtraction (a symmetric projection) for LayerNorm, and b is the
LayerNorm's bias (zero for RMSNorm). A term t of the residual stream therefore adds w . g * (C t) = (C (g * w)) . t
to the logit of a token with LM-head row w: ``seed(w)`` is that cotangent. The bias adds the constant w . b.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from linlens.engine.capture import final_norm
from linlens.engine.forward import ExplanationPass
from linlens.engine.linear_modules import LinearizedLayerNorm, LinearizedRMSNorm


@dataclass(frozen=True)
class FrozenFinalNorm:
    """The final norm at the last position of one pass, frozen (see the module docstring)."""

    #: coefficient * weight, shape (d,).
    gain: torch.Tensor
    #: Whether the norm subtracts the mean (LayerNorm) before scaling.
    centred: bool
    #: The norm's bias (zeros without one), shape (d,).
    bias: torch.Tensor

    @classmethod
    def of(cls, p: ExplanationPass, h_final: torch.Tensor) -> FrozenFinalNorm:
        """The final norm of ``p``'s twin at ``h_final``, the last layer's output at the last position (d,): its
        coefficient computed by the norm module itself, as the pass froze it."""
        module = final_norm(p.twin, p.context.family)
        if not isinstance(module, (LinearizedRMSNorm, LinearizedLayerNorm)):
            raise ValueError(f"{type(module).__name__}: the final norm was not linearised")
        d = p.context.hidden_size
        coefficient = module.coefficient(h_final.detach().to(p.dtype))  # (1,): 1/rms or 1/std at this position
        gain = (coefficient * module.gain(p.dtype)).expand(d).clone()
        bias = module.bias_term(p.dtype)
        zeros = torch.zeros(d, dtype=p.dtype, device=gain.device)
        return cls(gain=gain, centred=module.centred, bias=bias.expand(d).clone() if bias is not None else zeros)

    def linear(self, vectors: torch.Tensor) -> torch.Tensor:
        """The linear part g * (C v) for vectors along the last dimension (..., d)."""
        if self.centred:
            vectors = vectors - vectors.mean(dim=-1, keepdim=True)
        return vectors * self.gain

    def columns(self, vectors: torch.Tensor) -> torch.Tensor:
        """The linear part applied to each column of ``vectors`` (d, k): what the LM head reads, logit-lens style."""
        return self.linear(vectors.T).T

    def seed(self, w: torch.Tensor) -> torch.Tensor:
        """The cotangent C (g * w) that turns a residual-stream term t into its logit share w . g * (C t)."""
        s = self.gain * w
        return s - s.mean() if self.centred else s

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """y for a residual stream h (d,): g * (C h) + b."""
        return self.linear(h) + self.bias


__all__ = ["FrozenFinalNorm"]
