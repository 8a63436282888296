"""Top-k singular triplets of linear maps known only through products: randomized block Krylov (Golub-Kahan).

The detached Jacobian of a d-wide model is d x d per input position, and building it costs d backward passes. Its
top few singular triplets need far fewer: products with the map (JVPs) and with its transpose (VJPs), in blocks that
each cost one batched backward pass (:mod:`linlens.engine.products`). This module knows nothing of models: it takes
P independent maps A_p (``BlockMaps``) and advances them in lockstep, so one batched product serves all of them (the
spectra of every input position cost the passes of one).

The method is block Lanczos bidiagonalisation with full reorthogonalisation, which keeps every iterate (unlike plain
power iteration, so a small gap after sigma_k costs little): start from A Omega for a seeded Gaussian block Omega of
b = k + p columns, then alternate Z_j = A^T Q_j and Q_{j+1} = orth(A Z_j minus its part in Q_0..Q_j). With Q the
orthonormal basis of the left Krylov space, B = Q^T A is exactly the stacked Z_j, so the Rayleigh-Ritz triplets come
from a small SVD of B at no further cost: (1 + 2q) b products for q iterations, whatever d is. Each answer carries
its certificates:

    residual_left  = ||A v - s u|| / s      (the real test of the left space: v lies in span(Z_0..Z_j), so A v is a
                                             combination of the growth pass's products A Z_j, taken anyway)
    residual_right = ||A^T u - s v|| / s    (k fresh VJPs, once the left ones pass: zero by the SVD's own identity
                                             if read off B, so it is never read off B)

and the iterations stop as soon as every left certificate is below its target: the cost is passes, so the check
rides in a pass that is needed anyway, and the only pass of its own is the narrow one of the right certificates.

so a matrix-free answer is as checkable as a full SVD. ||A||_F^2, which needs the whole matrix, is estimated from the
start block (Hutchinson: E ||A w||^2 = ||A||_F^2 for a standard Gaussian w) with its standard error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Products = Callable[[torch.Tensor], torch.Tensor]


class Cancelled(RuntimeError):
    """The caller asked to stop between two blocks of products."""


@dataclass(frozen=True)
class BlockMaps:
    """P maps A_p: R^in_dim -> R^out_dim, given by batched products for all of them at once."""

    count: int
    in_dim: int
    out_dim: int
    #: (P, b, in_dim) -> (P, b, out_dim): A_p v for each map's own block of b vectors.
    apply: Products
    #: (P, b, out_dim) -> (P, b, in_dim): A_p^T u.
    apply_transposed: Products
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class Triplets:
    """The top singular triplets of one map, with their certificates."""

    #: (k,) descending.
    values: torch.Tensor
    #: (out_dim, k) and (in_dim, k), orthonormal columns.
    left: torch.Tensor
    right: torch.Tensor
    #: (k,) ||A v - s u|| / s and ||A^T u - s v|| / s from fresh products.
    residual_left: torch.Tensor
    residual_right: torch.Tensor
    #: Estimate of ||A||_F^2 and one standard error of it.
    frobenius_sq: float
    frobenius_sq_error: float


@dataclass(frozen=True)
class Report:
    """What one solve cost."""

    iterations: int
    jvps: int
    vjps: int
    #: (P, e, out): A_p applied to the caller's ``extra`` vectors (None without them).
    extra_images: torch.Tensor | None = None


def _orthonormal(block: torch.Tensor, basis: list[torch.Tensor], tiny: float, reference: float = 0.0) -> torch.Tensor:
    """The part of ``block`` (out, b) outside span(basis), orthonormalised. Directions whose remaining size is below
    ``tiny`` times the block's own, or ``reference``'s if larger (the map's norm, for a block of unit vectors
    through it: a null direction's image is rounding, however small the block), are dropped."""
    if block.shape[1] == 0:
        return block
    scale = max(float(torch.linalg.matrix_norm(block, ord=2)), reference)
    for _ in range(2):  # twice is enough (Kahan-Parlett) for full reorthogonalisation
        for q in basis:
            block = block - q @ (q.T @ block)
    u, s, _ = torch.linalg.svd(block, full_matrices=False)
    room = block.shape[0] - sum(q.shape[1] for q in basis)
    keep = (s > tiny * max(scale, 1e-300)) & (torch.arange(s.numel(), device=s.device) < room)
    u = u[:, keep]
    if basis and u.shape[1]:  # a kept direction barely above the threshold carries the projection's rounding
        for q in basis:
            u = u - q @ (q.T @ u)
        u = torch.linalg.qr(u).Q
    return u


#: Krylov iterations at most (each keeps a block of rows of the map's input size: the memory estimate counts them).
MAX_ITERATIONS = 16


def top_singular_triplets(
    maps: BlockMaps,
    k: int,
    *,
    oversample: int | None = None,
    max_iterations: int = MAX_ITERATIONS,
    target: float | None = None,
    seed: int = 0,
    extra: torch.Tensor | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_products: Callable[[int], None] | None = None,
) -> tuple[list[Triplets], Report]:
    """The top ``k`` singular triplets of every map in ``maps`` (see the module docstring).

    The iterations stop once every left certificate of the current answer is below ``target`` (default 1e-10 in
    float64, 1e-5 otherwise: near what rounding allows; a triplet with residual r has its value within r s of a true
    singular value, so a settled certificate settles the values too), or after ``max_iterations``; the certificates
    returned are those of the answer returned. The same ``seed`` gives the same answer. ``on_products`` receives the
    size of each batch done. ``extra`` (P, e, in_dim) are more vectors to apply each map to in the start pass
    (``Report.extra_images``): an image the caller needs anyway (J x for captured shares) costs no pass of its own.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    P, n_in, n_out, dtype = maps.count, maps.in_dim, maps.out_dim, maps.dtype
    k = min(k, n_in, n_out)
    block = min(k + (oversample if oversample is not None else max(5, k)), n_in, n_out)
    eps = torch.finfo(dtype).eps
    target = target if target is not None else (1e-10 if dtype == torch.float64 else 1e-5)
    tiny = 100 * eps
    done = {"jvps": 0, "vjps": 0}

    def counted(product: Products, kind: str) -> Products:
        """``product`` with the stop check before it and the count (and progress) after it."""

        def run(vectors: torch.Tensor) -> torch.Tensor:  # (P, b, in) -> (P, b, out), or transposed
            if should_stop is not None and should_stop():
                raise Cancelled("stopped between two blocks of products")
            out = product(vectors)
            count = vectors.shape[0] * vectors.shape[1]
            done[kind] += count
            if on_products is not None:
                on_products(count)
            return out

        return run

    apply = counted(maps.apply, "jvps")
    apply_transposed = counted(maps.apply_transposed, "vjps")

    generator = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn((P, block, n_in), generator=generator, dtype=torch.float64).to(maps.device, dtype)
    # The Frobenius probes and the caller's extra vectors ride in the start pass: a pass costs about the same for a
    # few more vectors, and the probes are independent of the Krylov space that the start block seeds.
    probes = torch.randn((P, block, n_in), generator=generator, dtype=torch.float64).to(maps.device, dtype)
    riders = [omega, probes] if extra is None else [omega, probes, extra.to(maps.device, dtype)]
    started = apply(torch.cat(riders, dim=1))
    start, probe_images = started[:, :block], started[:, block : 2 * block]
    extra_images = started[:, 2 * block :] if extra is not None else None

    bases: list[list[torch.Tensor]] = [[] for _ in range(P)]  # per map: orthonormal blocks Q_j (out, b_j)
    rows: list[list[torch.Tensor]] = [[] for _ in range(P)]  # per map: Z_j^T = Q_j^T A, (b_j, in)
    right: list[list[torch.Tensor]] = [[] for _ in range(P)]  # per map: orthonormal blocks P_j of the right space
    images: list[list[torch.Tensor]] = [[] for _ in range(P)]  # per map: A P_j, (out, b_j), from the growth passes
    newest = [_orthonormal(start[p].T, [], tiny) for p in range(P)]
    iterations = 0
    triplets: list[Triplets] = []
    while True:
        width = max(q.shape[1] for q in newest)
        cotangents = torch.zeros((P, width, n_out), dtype=dtype, device=maps.device)
        for p, q in enumerate(newest):
            cotangents[p, : q.shape[1]] = q.T
        transposed = apply_transposed(cotangents)  # (P, width, in): rows Q_j^T A
        for p, q in enumerate(newest):
            bases[p].append(q)
            rows[p].append(transposed[p, : q.shape[1]])
        ritz = [_ritz(bases[p], rows[p], k) for p in range(P)]
        full = all(sum(q.shape[1] for q in bases[p]) >= min(n_in, n_out) for p in range(P))
        if full or iterations >= max_iterations:
            triplets = _certify(ritz, k, apply, apply_transposed)
            break
        iterations += 1
        # The growth pass applies A to the new part of the right space span(Z_0..Z_j), orthonormalised (P_j): the
        # same next block as A Z_j (A Z_i for i < j lies in span(Q) already), and well-conditioned products from
        # which A v is read for any v in the right space.
        norms = [float(r[1][0]) for r in ritz]  # ||A|| as far as known: the scale of A P_j and of A^T Q_j
        fresh = [_orthonormal(rows[p][-1].T, right[p], tiny, norms[p]) for p in range(P)]
        width = max(f.shape[1] for f in fresh)
        tangents = torch.zeros((P, width, n_in), dtype=dtype, device=maps.device)
        for p, f in enumerate(fresh):
            tangents[p, : f.shape[1]] = f.T
        grown = apply(tangents) if width else tangents.new_zeros((P, 0, n_out))  # (P, width, out)
        for p, f in enumerate(fresh):
            right[p].append(f)
            images[p].append(grown[p, : f.shape[1]].T)
        # The left certificates of this answer ride in the growth pass: its right vectors lie in span(P_0..P_j), so
        # A v is a combination of the products A P_i taken so far (see _left_from_images); only when they all pass
        # does the answer stop, after one narrow pass for its right certificates.
        left = _left_from_images(ritz, right, images, k)
        if left is None:  # a map with fewer than k directions: certify with fresh products, as a full SVD would
            triplets = _certify(ritz, k, apply, apply_transposed)
            if max(float(t.residual_left.max()) for t in triplets) <= target:
                break
        elif float(left.max()) <= target:
            triplets = _certify(ritz, k, None, apply_transposed, residual_left=left)
            break
        newest = [_orthonormal(grown[p, : right[p][-1].shape[1]].T, bases[p], tiny, norms[p]) for p in range(P)]
        if all(q.shape[1] == 0 for q in newest):  # an invariant subspace: the answer is exact already
            triplets = _certify(ritz, k, apply, apply_transposed)
            break
    # ||A||_F only for the answer returned
    triplets = _with_frobenius(triplets, *_frobenius(bases, rows, probe_images, maps))
    return triplets, Report(iterations=iterations, jvps=done["jvps"], vjps=done["vjps"], extra_images=extra_images)


def _ritz(
    basis: list[torch.Tensor], rows: list[torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(left vectors U = Q W, values, right vectors V) from B = Q^T A (the stacked rows).

    A map with fewer than k directions (a zero map: a position the prediction cannot see) gets zero values and
    orthonormal vectors completed arbitrarily, as a full SVD gives them."""
    q = torch.cat(basis, dim=1)  # (out, m)
    b = torch.cat(rows, dim=0)  # (m, in)
    w, s, vh = torch.linalg.svd(b, full_matrices=False)
    left, right = q @ w[:, :k], vh[:k].T
    missing = k - left.shape[1]
    if missing > 0:
        s = torch.cat([s, s.new_zeros(missing)])
        left = _complete(left, missing)
        right = _complete(right, missing)
    return left, s, right


def _complete(columns: torch.Tensor, missing: int) -> torch.Tensor:
    """``columns`` (dim, m) with ``missing`` more orthonormal columns appended."""
    dim = columns.shape[0]
    extra = torch.eye(dim, dtype=columns.dtype, device=columns.device)
    extra = extra - columns @ (columns.T @ extra)
    u, _, _ = torch.linalg.svd(extra, full_matrices=False)
    return torch.cat([columns, u[:, :missing]], dim=1)


def _frobenius(
    bases: list[list[torch.Tensor]],
    rows: list[list[torch.Tensor]],
    images: torch.Tensor,
    maps: BlockMaps,
) -> tuple[torch.Tensor, torch.Tensor]:
    """||A||_F^2 = ||Q^T A||_F^2 (exact: the Krylov rows) + ||(I - Q Q^T) A||_F^2 (Hutchinson, from the ``images``
    (P, b, out) of b Gaussian probes drawn apart from the start block).

    The top of the spectrum, which dominates the variance of a plain Hutchinson estimate, lies in Q already, so the
    estimated remainder is the flat tail: a small error bar for b more JVPs. Returns (estimate, standard error)."""
    exact = torch.tensor([sum(float((r.double() ** 2).sum()) for r in rows[p]) for p in range(maps.count)])
    block = images.shape[1]
    tails = []
    for p in range(maps.count):
        q = torch.cat(bases[p], dim=1)
        rest = images[p].T - q @ (q.T @ images[p].T)  # (out, b)
        tails.append((rest.double() ** 2).sum(dim=0))
    tail = torch.stack(tails).cpu()  # (P, b)
    estimate = exact + tail.mean(dim=1)
    if block < 2:
        return estimate, torch.full((maps.count,), math.inf)
    # One standard error, kept honest: the sample's own, no less than that of a tail held by a single direction
    # (sqrt(2/b) of its mean), and no less than what the precision's rounding allows.
    floor = 1e-7 if maps.dtype == torch.float64 else 1e-3
    error = torch.maximum(tail.std(dim=1), math.sqrt(2.0) * tail.mean(dim=1)) / math.sqrt(block)
    return estimate, torch.maximum(error, floor * estimate)


def _left_from_images(
    ritz: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    right: list[list[torch.Tensor]],
    images: list[list[torch.Tensor]],
    k: int,
) -> torch.Tensor | None:
    """(P, k) left residuals ||A v - s u|| / s of the Ritz triplets, from the growth products alone.

    The right vectors lie in span(Z_0..Z_j) = span(P_0..P_j) (orthonormal), so A v = [A P_0 ... A P_j] (P^T v), a
    combination with coefficients of norm 1 of the products the growth passes took. It is as honest as a fresh JVP
    of v: each A P_i carries the rounding of one product, and nothing in the combination cancels it (unlike
    A^T u = B^T w, the SVD's own identity, which :func:`_certify` therefore always takes fresh). None when some s is
    too small to divide by (a map with fewer than k directions): those get fresh products."""
    residuals = []
    for (left, values, vectors), own_right, own_images in zip(ritz, right, images, strict=True):
        s = values[:k]
        if float(s.min()) <= 1e3 * torch.finfo(s.dtype).eps * max(float(s[0]), 1e-300):
            return None
        basis = torch.cat(own_right, dim=1)  # (in, m)
        image = torch.cat(own_images, dim=1) @ (basis.T @ vectors)  # (out, k): A v
        residuals.append((image - left * s).norm(dim=0) / s)
    return torch.stack(residuals)


def _certify(
    ritz: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    k: int,
    apply: Products | None,
    apply_transposed: Products,
    *,
    residual_left: torch.Tensor | None = None,
) -> list[Triplets]:
    """Residual certificates from fresh products: k JVPs (unless ``residual_left`` (P, k) came from the growth
    products already) and k VJPs per map."""
    left = torch.stack([r[0] for r in ritz])  # (P, out, k)
    values = torch.stack([r[1][:k] for r in ritz])  # (P, k)
    right = torch.stack([r[2] for r in ritz])  # (P, in, k)
    scale = values.clamp_min(1e-300)
    if residual_left is None:
        assert apply is not None
        image = apply(right.transpose(1, 2))  # (P, k, out): A v
        residual_left = (image - values[..., None] * left.transpose(1, 2)).norm(dim=-1) / scale
    back = apply_transposed(left.transpose(1, 2))  # (P, k, in): A^T u
    residual_right = (back - values[..., None] * right.transpose(1, 2)).norm(dim=-1) / scale
    return [
        Triplets(
            values=values[p],
            left=left[p],
            right=right[p],
            residual_left=residual_left[p],
            residual_right=residual_right[p],
            frobenius_sq=math.nan,  # set by _with_frobenius for the answer returned
            frobenius_sq_error=math.nan,
        )
        for p in range(len(ritz))
    ]


def _with_frobenius(triplets: list[Triplets], estimate: torch.Tensor, error: torch.Tensor) -> list[Triplets]:
    return [
        dataclasses.replace(t, frobenius_sq=float(estimate[p]), frobenius_sq_error=float(error[p]))
        for p, t in enumerate(triplets)
    ]


__all__ = ["BlockMaps", "Cancelled", "Report", "Triplets", "top_singular_triplets"]
