"""Singular-value analysis of per-token Jacobians J_i: sign-fixed components, captured shares, stable rank.

The paper's observation is that each J_i is nearly low rank: a few singular directions carry the token's whole
contribution to y. These functions measure that and prepare the directions for decoding into tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from linlens.engine.matrix_free import Triplets


@dataclass(frozen=True)
class Spectrum:
    """Top singular triples of one J_i plus the numbers that summarise its effective dimension."""

    values: torch.Tensor  # (r,) all singular values, descending
    left: torch.Tensor  # (d_out, k) top-k left vectors, each pointing along y
    right: torch.Tensor  # (d_in, k) matching right vectors (flipped with the left ones, so J is unchanged)
    captured_share: torch.Tensor  # (k,) share of ||J_i x_i||^2 inside span(u_1..u_j), j = 1..k
    stable_rank: float
    term_norm: float


def decompose(jacobians: torch.Tensor, inputs: torch.Tensor, y: torch.Tensor, top_k: int) -> list[Spectrum]:
    """SVD of each J_i in ``jacobians`` (m, d_out, d_in) with its input ``inputs`` (m, d_in); signs follow ``y``.

    A singular pair (u, v) is defined up to a joint sign; choosing u . y >= 0 makes "u decodes to the predicted
    token" a statement about the direction that actually builds y, and flipping v with it keeps u s v^T the same.
    """
    u, s, vh = torch.linalg.svd(jacobians, full_matrices=False)
    k = min(top_k, s.shape[-1])
    left = u[..., :k]
    right = vh[..., :k, :].transpose(-1, -2)
    signs = torch.where((left * y[None, :, None]).sum(dim=1) < 0, -1.0, 1.0).to(left.dtype)  # (m, k)
    left = left * signs[:, None, :]
    right = right * signs[:, None, :]

    terms = torch.einsum("mod,md->mo", jacobians, inputs)  # J_i x_i
    term_energy = (terms * terms).sum(dim=-1)
    projections = torch.einsum("mok,mo->mk", u[..., :k], terms)
    captured = (
        torch.cumsum(projections * projections, dim=-1) / term_energy.clamp_min(torch.finfo(s.dtype).tiny)[:, None]
    )
    stable = (s * s).sum(dim=-1) / (s[:, 0] * s[:, 0]).clamp_min(torch.finfo(s.dtype).tiny)

    return [
        Spectrum(
            values=s[i],
            left=left[i],
            right=right[i],
            captured_share=captured[i],
            stable_rank=float(stable[i]),
            term_norm=float(term_energy[i].sqrt()),
        )
        for i in range(jacobians.shape[0])
    ]


def truncated_relative_errors(
    spectra: list[Spectrum], jacobians: torch.Tensor, inputs: torch.Tensor, constant: torch.Tensor, y: torch.Tensor
) -> list[float]:
    """||sum_i J_i^(k) x_i + c - y|| / ||y|| for k = 1..top_k, J_i^(k) the rank-k truncation of every J_i.

    ``spectra`` must cover every position. J_i^(k) x_i is the projection of J_i x_i onto the top-k left singular
    subspace of J_i, so no truncated matrix is ever rebuilt.
    """
    terms = torch.einsum("nod,nd->no", jacobians, inputs)
    top_k = min(spectrum.left.shape[-1] for spectrum in spectra)
    errors = []
    for k in range(1, top_k + 1):
        truncated = sum(
            spectrum.left[:, :k] @ (spectrum.left[:, :k].T @ term)
            for spectrum, term in zip(spectra, terms, strict=True)
        )
        errors.append(float((truncated + constant - y).norm() / y.norm()))
    return errors


def exact_residuals(matrix: torch.Tensor, spectrum: Spectrum, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """||M v - s u|| / s and ||M^T u - s v|| / s for the top ``k`` of a materialised ``matrix`` (d_out, d_in)."""
    s = spectrum.values[:k].clamp_min(1e-300)
    u, v = spectrum.left[:, :k], spectrum.right[:, :k]
    left = (matrix @ v - u * s).norm(dim=0) / s
    right = (matrix.T @ u - v * s).norm(dim=0) / s
    return left, right


def from_triplets(triplets: Triplets, terms: torch.Tensor, y: torch.Tensor, k: int) -> Spectrum:
    """A Spectrum (signs along y, captured shares of each exact term) from matrix-free triplets.

    ``terms`` (m, d_out) are the images whose shares are measured (J_i x_i, or J x for a whole map)."""
    signs = torch.where(triplets.left.T @ y < 0, -1.0, 1.0).to(triplets.left.dtype)
    left, right = triplets.left * signs, triplets.right * signs
    term = terms.sum(dim=0)
    energy = (term * term).sum()
    projections = left.T @ term
    captured = torch.cumsum(projections * projections, dim=0) / energy.clamp_min(torch.finfo(term.dtype).tiny)
    values = triplets.values
    stable = triplets.frobenius_sq / max(float(values[0]) ** 2, 1e-300)
    return Spectrum(
        values=values,
        left=left,
        right=right,
        captured_share=captured,
        stable_rank=stable,
        term_norm=float(energy.sqrt()),
    )
