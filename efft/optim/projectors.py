"""Subspaces for projected optimizers: one module so GaLore, APOLLO and FRUGAL share one definition.

A projection of a 2-D gradient G (m x n) has a *side*: ``left`` keeps an m x r basis P and works
on R = P^T G (r x n); ``right`` keeps an r x n basis P and works on R = G P^T (m x r). The side is
decided once from the shape and ``proj_type`` and stored, never re-guessed from the shape of R
(guessing is how the peers apply "reverse_std" backwards when r exceeds a dimension).

Bases come from an exact fp32 SVD (with a fallback when LAPACK/cuSOLVER does not converge), a
randomized SVD warm-started from the previous basis (a few matmuls instead of a full SVD), a
seeded Gaussian matrix regenerated on demand (nothing stored; identical on every DDP rank), or a
seeded choice of rows/columns (FRUGAL's coordinate blocks).
"""
from __future__ import annotations

import math
import threading
import warnings

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right")
_INT64_MAX = torch.iinfo(torch.int64).max


def check_proj_type(proj_type: str) -> str:
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
    return proj_type


def choose_side(shape: tuple[int, int], proj_type: str) -> str:
    """``std`` projects the smaller dimension (left when m < n), ``reverse_std`` the larger one."""
    m, n = shape
    check_proj_type(proj_type)
    if proj_type == "std":
        return "left" if m < n else "right"
    if proj_type == "reverse_std":
        return "right" if m < n else "left"
    return proj_type


def effective_rank(shape: tuple[int, int], rank: int) -> int:
    return min(rank, shape[0], shape[1])


def project(g: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    return basis.t() @ g if side == "left" else g @ basis.t()


def project_back(low: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    return basis @ low if side == "left" else low @ basis


def add_back_projected_(p: torch.Tensor, low: torch.Tensor, basis: torch.Tensor, side: str, alpha: float,
                        beta: float = 1.0) -> None:
    """p = beta * p + alpha * back-projection of ``low``, as one in-place GEMM (``addmm_``).

    The authors' code computes the full-size back-projection, then adds it (and decays p in a
    third pass); ``addmm_`` accumulates the product straight into p: no m x n temporary and one
    pass over p. Equal to GEMM-then-add up to rounding. ``beta`` != 1 folds a weight decay that
    follows the update: (p + a U)(1 - c) = (1 - c) p + a (1 - c) U.
    """
    if low.dtype != basis.dtype:
        low = low.to(basis.dtype)
    if p.dtype != basis.dtype:  # addmm_ needs one dtype: GEMM in the basis' dtype, then add
        if beta != 1.0:
            p.mul_(beta)
        p.add_(project_back(low, basis, side).to(p.dtype), alpha=alpha)
    elif side == "left":
        p.addmm_(basis, low, beta=beta, alpha=alpha)
    else:
        p.addmm_(low, basis, beta=beta, alpha=alpha)


# ------------------------------------------------------------------------------------------ seeds
def next_seed(seed: int, advance: int = 15) -> int:
    """The seed of the next refresh: the ``advance``-th int64 drawn from a generator seeded with
    ``seed`` (the rule apollo-torch uses, so seeded projections agree with it)."""
    gen = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, _INT64_MAX, (advance,), generator=gen)[-1])


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (same on every process; Python's hash is salted)."""
    h = 1469598103934665603
    for x in parts:
        h ^= int(x) & 0xFFFFFFFFFFFFFFFF
        h = (h * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


_generators = threading.local()


def _generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator for ``device`` reseeded with ``seed``; one kept per device and thread (cheaper
    than a new one; per thread because offload's workers step parameters concurrently, and a
    shared one could be reseeded by another worker between this seeding and the draw)."""
    device = torch.device(device)
    cache = getattr(_generators, "by_device", None)
    if cache is None:
        cache = _generators.by_device = {}
    gen = cache.get(device)
    if gen is None:
        gen = cache[device] = torch.Generator(device=device)
    return gen.manual_seed(seed)


# --------------------------------------------------------------------------------- random bases
def gaussian_basis(shape: tuple[int, int], rank: int, side: str, seed: int, device, dtype=torch.float32) -> torch.Tensor:
    """Gaussian N(0, 1/r) projection (m x r for left, r x n for right), regenerated from ``seed``."""
    m, n = shape
    size = (m, rank) if side == "left" else (rank, n)
    device = torch.device(device)
    out = torch.randn(size, generator=_generator(seed, device), device=device, dtype=torch.float32)
    out.div_(math.sqrt(rank))
    return out if dtype == torch.float32 else out.to(dtype)


def orthonormal_random_basis(shape: tuple[int, int], rank: int, side: str, seed: int, device) -> torch.Tensor:
    """Orthonormalised Gaussian basis (so P P^T is a projector), regenerated from ``seed``."""
    g = gaussian_basis(shape, rank, side, seed, device)
    if side == "left":
        return torch.linalg.qr(g).Q
    return torch.linalg.qr(g.t()).Q.t().contiguous()


def block_indices(size: int, count: int, seed: int, device) -> torch.Tensor:
    """``count`` distinct sorted indices out of ``size`` (FRUGAL's coordinate block), from ``seed``."""
    perm = torch.randperm(size, generator=_generator(seed, torch.device("cpu")))[:count]
    return perm.sort().values.to(device)


# ------------------------------------------------------------------------------------ SVD bases
def _basis_from_svd(u: torch.Tensor, vh: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    return u[:, :rank].contiguous() if side == "left" else vh[:rank, :].contiguous()


def svd_basis(g: torch.Tensor, rank: int, side: str, *, seed: int = 0) -> torch.Tensor:
    """Top-``rank`` singular basis of ``g`` by an exact fp32 SVD.

    If the SVD fails to converge (or returns non-finite values) it warns and retries on a slightly
    jittered copy, and then falls back to a randomized SVD, instead of stopping the run.
    """
    a = g.float()
    try:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        if torch.isfinite(s).all():
            return _basis_from_svd(u, vh, rank, side)
        reason = "non-finite singular values"
    except (torch.linalg.LinAlgError, RuntimeError) as e:  # cuSOLVER reports non-convergence as either
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    warnings.warn(f"SVD of a {tuple(a.shape)} gradient did not converge ({reason}); retrying with jitter", RuntimeWarning, stacklevel=2)
    scale = float(a.abs().max()) or 1.0
    noise = torch.randn(a.shape, generator=_generator(seed, torch.device("cpu")), dtype=torch.float32).to(a.device)
    try:
        u, s, vh = torch.linalg.svd(a + noise.mul_(1e-6 * scale), full_matrices=False)
        if torch.isfinite(s).all():
            return _basis_from_svd(u, vh, rank, side)
    except (torch.linalg.LinAlgError, RuntimeError):
        pass
    warnings.warn("jittered SVD failed as well; using a randomized SVD", RuntimeWarning, stacklevel=2)
    return randomized_svd_basis(a, rank, side, seed=seed)


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y).Q


def randomized_svd_basis(
    g: torch.Tensor, rank: int, side: str, *, previous: torch.Tensor | None = None, seed: int = 0,
    oversample: int = 8, power_iters: int | None = None,
) -> torch.Tensor:
    """Top-``rank`` singular basis by randomized subspace iteration (Halko et al.), fp32.

    Warm start: the previous basis spans most of the new top subspace (gradients drift slowly), so
    it seeds the iteration and one power iteration suffices; a cold start draws a seeded Gaussian
    sketch and runs two. Cost O(m n (r + oversample)) instead of the full SVD's O(m n min(m, n)).
    """
    a = g.float()
    if side == "right":
        a = a.t()
        if previous is not None:
            previous = previous.t()
    m, n = a.shape
    k = min(rank + oversample, m, n)
    gen = _generator(seed, a.device)
    if previous is not None and previous.shape == (m, rank):
        extra = k - rank
        q = previous.float()
        if extra > 0:
            q = torch.cat([q, torch.randn(m, extra, generator=gen, device=a.device)], dim=1)
        q = _orth(q)
        iters = 1 if power_iters is None else power_iters
    else:
        q = _orth(a @ torch.randn(n, k, generator=gen, device=a.device))
        iters = 2 if power_iters is None else power_iters
    for _ in range(iters):
        q = _orth(a @ _orth(a.t() @ q))
    small = q.t() @ a  # k x n
    ub, _, _ = torch.linalg.svd(small, full_matrices=False)
    u = q @ ub[:, :rank]
    return u.contiguous() if side == "left" else u.t().contiguous()


# ------------------------------------------------------------------------------------- schedule
def stagger_offsets(count: int, gap: int) -> list[int]:
    """Refresh phase of each of ``count`` parameters, spread evenly over ``gap`` steps."""
    return [(i * gap) // count for i in range(count)] if count else []


def refresh_due(step: int, gap: int, offset: int, has_basis: bool) -> bool:
    """A parameter refreshes when it has no basis yet, then every ``gap`` steps from its phase."""
    return (not has_basis) or (step - offset) % gap == 0
