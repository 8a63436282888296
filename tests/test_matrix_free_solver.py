"""The block Krylov solver alone (engine/matrix_free.py) on explicit matrices: the reference is their dense SVD.

Breakage these tests were seen to catch (made once on purpose): left certificates reported 1000 times smaller than
the truth (the float32 honesty test and the float64 full-rank cases fail). The rank-deficient cases did not catch a
growth threshold taken relative to the block instead of the map (synthetic ranks stay clean); the layer-map
comparison in tests/test_engine_matrix_free.py (a tiny model's attention block) is the one that caught that.
"""

from __future__ import annotations

import pytest
import torch

from linlens.engine.matrix_free import BlockMaps, top_singular_triplets


def _maps(matrix: torch.Tensor) -> BlockMaps:
    return BlockMaps(
        count=1,
        in_dim=int(matrix.shape[1]),
        out_dim=int(matrix.shape[0]),
        apply=lambda v: v @ matrix.T,
        apply_transposed=lambda u: u @ matrix,
        dtype=matrix.dtype,
        device=matrix.device,
    )


def _matrix(rank: int, decay: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(64, 64, generator=generator, dtype=torch.float64))
    values = torch.zeros(64, dtype=torch.float64)
    values[:rank] = 7.0 * decay ** torch.arange(rank, dtype=torch.float64)
    return ((u * values) @ v.T).to(dtype)


@pytest.mark.parametrize("rank", [12, 24, 64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_triplets_of_explicit_maps_in_float64(rank: int, seed: int) -> None:
    matrix = _matrix(rank, 0.93, seed, torch.float64)
    (found,), _ = top_singular_triplets(_maps(matrix), 2)
    s = torch.linalg.svdvals(matrix)
    assert float((found.values - s[:2]).abs().max() / s[0]) < 1e-10
    for i in range(2):
        u, v, sigma = found.left[:, i], found.right[:, i], float(found.values[i])
        left = float((matrix @ v - sigma * u).norm()) / sigma
        right = float((matrix.T @ u - sigma * v).norm()) / sigma
        for reported, recomputed in ((float(found.residual_left[i]), left), (float(found.residual_right[i]), right)):
            assert reported <= 1e-10
            assert (reported < 1e-12 and recomputed < 1e-12) or 0.5 <= reported / recomputed <= 2.0


def test_left_certificates_from_the_growth_pass_are_honest_in_float32() -> None:
    """Slow decay (a small gap after the top k) in float32: the left certificates are read off the growth pass,
    the right ones are fresh; both must agree with the residuals recomputed in float64 within a factor of 2."""
    matrix = _matrix(64, 0.97, 3, torch.float32)
    (found,), report = top_singular_triplets(_maps(matrix), 3)
    exact = matrix.double()
    for i in range(3):
        u, v, sigma = found.left[:, i].double(), found.right[:, i].double(), float(found.values[i])
        left = float((exact @ v - sigma * u).norm()) / sigma
        right = float((exact.T @ u - sigma * v).norm()) / sigma
        assert 0.5 <= float(found.residual_left[i]) / left <= 2.0, (i, float(found.residual_left[i]), left)
        assert 0.5 <= float(found.residual_right[i]) / right <= 2.0, (i, float(found.residual_right[i]), right)
    assert report.iterations >= 1
