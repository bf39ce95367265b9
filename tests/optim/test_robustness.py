"""Failures the peers' users report: SVD non-convergence, rank larger than the matrix, inf/nan
gradients, bad arguments; and the projector pieces (randomized SVD, staggered refresh)."""
import warnings

import pytest
import torch

from efft.optim import APOLLOAdamW, FRUGAL, GaLoreAdamW
from efft.optim import projectors

ALL = [GaLoreAdamW, APOLLOAdamW, FRUGAL]


def _weight(m=24, n=40, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Parameter(torch.randn(m, n) * 0.1)


def _subspace_error(a, b):
    """Distance between the spans of two orthonormal bases (0: same subspace)."""
    return torch.linalg.matrix_norm(a @ a.T - b @ b.T, ord=2).item()


def test_svd_non_convergence_falls_back_with_warning(monkeypatch):
    real = torch.linalg.svd
    calls = {"n": 0}

    def flaky(a, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(a, *args, **kw)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    g = torch.randn(30, 20)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        basis = projectors.svd_basis(g, 5, "right")
    u, s, vh = real(g, full_matrices=False)
    assert basis.shape == (5, 20)
    assert _subspace_error(basis.T, vh[:5].T) < 1e-3  # the jittered SVD is as good


def test_svd_fallback_to_randomized_when_jitter_fails(monkeypatch):
    real = torch.linalg.svd

    def broken_on_full(a, *args, **kw):
        if min(a.shape) > 12:  # the full-size SVDs fail; the small one inside rSVD works
            raise torch.linalg.LinAlgError("failed to converge")
        return real(a, *args, **kw)

    monkeypatch.setattr(torch.linalg, "svd", broken_on_full)
    u0 = torch.linalg.qr(torch.randn(40, 3)).Q
    g = u0 @ torch.diag(torch.tensor([10.0, 5.0, 2.0])) @ torch.linalg.qr(torch.randn(30, 3)).Q.T + 1e-3 * torch.randn(40, 30)
    with pytest.warns(RuntimeWarning, match="randomized"):
        basis = projectors.svd_basis(g, 3, "left")
    assert _subspace_error(basis, u0) < 1e-2


def test_galore_step_survives_svd_failure(monkeypatch):
    real = torch.linalg.svd
    state = {"fail": True}

    def flaky(a, *args, **kw):
        if state.pop("fail", False):
            raise torch.linalg.LinAlgError("failed to converge")
        return real(a, *args, **kw)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    w = _weight()
    opt = GaLoreAdamW([{"params": [w], "rank": 4}])
    w.grad = torch.randn_like(w)
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert torch.isfinite(w).all()


def test_randomized_svd_warm_start_tracks_exact_subspace():
    torch.manual_seed(0)
    m, n, r = 120, 80, 8
    u = torch.linalg.qr(torch.randn(m, r)).Q
    v = torch.linalg.qr(torch.randn(n, r)).Q
    spec = torch.logspace(1, 0, r)
    g = u @ torch.diag(spec) @ v.T + 0.01 * torch.randn(m, n)
    exact = torch.linalg.svd(g, full_matrices=False).U[:, :r]
    cold = projectors.randomized_svd_basis(g, r, "left", seed=1)
    assert _subspace_error(cold, exact) < 1e-2
    drifted = g + 0.01 * torch.randn(m, n)  # gradients drift slowly between refreshes
    warm = projectors.randomized_svd_basis(drifted, r, "left", previous=cold, seed=2)
    exact2 = torch.linalg.svd(drifted, full_matrices=False).U[:, :r]
    assert _subspace_error(warm, exact2) < 2e-2
    assert torch.allclose(warm.T @ warm, torch.eye(r), atol=1e-5)
    right = projectors.randomized_svd_basis(g, r, "right", seed=1)
    assert right.shape == (r, n)
    assert _subspace_error(right.T, torch.linalg.svd(g, full_matrices=False).Vh[:r].T) < 1e-2


def test_staggered_refresh_spreads_refreshes():
    ws = [_weight(seed=i) for i in range(8)]
    opt = GaLoreAdamW([{"params": ws, "rank": 4, "update_proj_gap": 8}], projector="rsvd", stagger_refresh=True)
    per_step = []
    for _ in range(16):
        before = [opt.state[w].get("refreshes", 0) for w in ws]
        for w in ws:
            w.grad = torch.randn_like(w)
        opt.step()
        per_step.append(sum(opt.state[w]["refreshes"] - b for w, b in zip(ws, before)))
    assert per_step[0] == 8  # every matrix needs a first basis
    assert max(per_step[1:]) == 1 and sum(per_step[8:16]) == 8  # then one a step, each once a gap


def test_gaussian_projection_is_regenerated_identically():
    a = projectors.gaussian_basis((16, 32), 4, "left", seed=7, device="cpu")
    b = projectors.gaussian_basis((16, 32), 4, "left", seed=7, device="cpu")
    assert torch.equal(a, b) and a.shape == (16, 4)
    assert abs(a.var().item() - 1 / 4) < 0.1
    assert not torch.equal(a, projectors.gaussian_basis((16, 32), 4, "left", seed=projectors.next_seed(7), device="cpu"))


@pytest.mark.parametrize("cls,extra", [(GaLoreAdamW, {}), (APOLLOAdamW, {}), (FRUGAL, {"projector": "svd"})])
def test_rank_larger_than_matrix_is_clipped_with_warning(cls, extra):
    w = _weight(6, 10)
    opt = cls([{"params": [w], "rank": 64, **extra}])
    w.grad = torch.randn_like(w)
    with pytest.warns(UserWarning, match="rank 64 exceeds"):
        opt.step()
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_that_parameter(cls, bad):
    w, other, bias = _weight(), _weight(seed=1), torch.nn.Parameter(torch.zeros(5))
    opt = cls([{"params": [bias]}, {"params": [w, other], "rank": 4}])
    for step in range(3):
        for p in (w, other, bias):
            p.grad = torch.randn_like(p)
        if step == 1:
            w.grad[3, 5] = bad
            bias.grad[0] = bad
        before_w, before_o = w.detach().clone(), other.detach().clone()
        opt.step()
        if step == 1:
            assert torch.equal(w, before_w)  # skipped
            assert not torch.equal(other, before_o)  # the others still update
    assert opt.skipped_nonfinite == 2
    assert all(torch.isfinite(p).all() for p in (w, other, bias))


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("key,value", [("rank", 0), ("rank", -3), ("update_proj_gap", 0), ("proj_type", "sideways"), ("scale", -1.0)])
def test_bad_group_arguments_name_the_argument(cls, key, value):
    group = {"params": [_weight()], "rank": 4, key: value}
    with pytest.raises(ValueError, match=key):
        cls([group])


def test_bad_optimizer_specific_arguments():
    with pytest.raises(ValueError, match="projector"):
        GaLoreAdamW([{"params": [_weight()], "rank": 4}], projector="qr")
    with pytest.raises(ValueError, match="scale_type"):
        APOLLOAdamW([{"params": [_weight()], "rank": 4, "scale_type": "row"}])
    with pytest.raises(ValueError, match="norm_growth_limit"):
        APOLLOAdamW([_weight()], norm_growth_limit=0.5)
    with pytest.raises(ValueError, match="density"):
        FRUGAL([{"params": [_weight()], "rank": 4, "density": 1.5}])
    with pytest.raises(ValueError, match="state_bits"):
        GaLoreAdamW([_weight()], state_bits=4)
    with pytest.raises(ValueError, match="lr"):
        GaLoreAdamW([_weight()], lr=-1.0)


@pytest.mark.parametrize("cls", ALL)
def test_one_dimensional_params_in_rank_group_get_adamw(cls):
    w, b = _weight(), torch.nn.Parameter(torch.zeros(7))
    opt = cls([{"params": [w, b], "rank": 4}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
            opt.step()
    assert opt.state[b]["exp_avg"].shape == (7,)


@pytest.mark.parametrize("cls,extra", [(GaLoreAdamW, {}), (GaLoreAdamW, {"projector": "rsvd"}), (APOLLOAdamW, {}),
                                       (APOLLOAdamW, {"scale_type": "tensor", "rank": 1}), (FRUGAL, {}), (FRUGAL, {"projector": "svd"})])
def test_bf16_parameters_keep_fp32_moments(cls, extra):
    torch.manual_seed(0)
    w = torch.nn.Parameter((torch.randn(24, 40) * 0.1).bfloat16())
    b = torch.nn.Parameter(torch.zeros(24, dtype=torch.bfloat16))
    ref = w.detach().float().clone()
    opt = cls([{"params": [b]}, {"params": [w], "rank": 4, **extra}], lr=1e-2)
    for _ in range(3):
        w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
        opt.step()
    assert w.dtype == torch.bfloat16 and torch.isfinite(w.float()).all()
    assert (w.float() - ref).abs().max() > 1e-3
    for st in opt.state.values():
        for k in ("exp_avg", "exp_avg_sq"):
            assert st[k].dtype == torch.float32
