"""The diagnostics math on cases with known answers."""

import math

import pytest
import torch

from mesh_tools.probe import metrics as M


def _rand(n=96, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def _orthogonal(d, seed=1):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def _reference_cka(k, l):
    """Textbook form: HSIC = tr(K H L H) / (n-1)^2 with an explicit centring matrix."""
    n = k.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    hsic = lambda a, b: torch.trace(a @ h @ b @ h) / (n - 1) ** 2  # noqa: E731
    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


@pytest.mark.parametrize("fn", [M.cka_rbf, M.cka_linear])
def test_cka_self_is_one(fn):
    x = _rand()
    assert fn(x, x) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("fn", [M.cka_rbf, M.cka_linear])
def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling(fn):
    x, y = _rand(seed=0), _rand(seed=5)
    y = 0.5 * x + y  # partly related, so the value is neither 0 nor 1
    q = _orthogonal(x.shape[1])
    base = fn(x, y)
    assert 0.05 < base < 0.95
    assert fn(3.7 * x @ q, y) == pytest.approx(base, abs=1e-9)
    assert fn(x, 0.01 * y @ q) == pytest.approx(base, abs=1e-9)
    assert fn(x, 4.0 * x @ q) == pytest.approx(1.0, abs=1e-9)


def test_linear_cka_is_not_invariant_to_anisotropic_scaling():
    """Guards against a CKA that is trivially 1 (e.g. normalising each feature away)."""
    x = _rand()
    s = torch.ones(x.shape[1], dtype=torch.float64)
    s[0] = 20.0
    assert M.cka_linear(x, x * s) < 0.9


@pytest.mark.parametrize("fn", [M.cka_rbf, M.cka_linear])
def test_cka_of_independent_random_matrices_is_low(fn):
    x, y = _rand(n=256, d=32, seed=10), _rand(n=256, d=32, seed=11)
    assert fn(x, y) < 0.2


def test_cka_matches_textbook_hsic():
    x, y = _rand(seed=2), _rand(seed=3) + 0.3 * _rand(seed=2)
    assert M.cka_linear(x, y) == pytest.approx(_reference_cka(x @ x.T, y @ y.T), abs=1e-10)
    assert M.cka_rbf(x, y) == pytest.approx(_reference_cka(M.rbf_gram(x), M.rbf_gram(y)), abs=1e-10)


def test_rbf_bandwidth_is_median_squared_distance_of_distinct_pairs():
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)  # squared distances 1, 9, 4 -> median 4
    d = M.squared_distances(x)
    assert M.rbf_bandwidth(d) == pytest.approx(4.0)
    k = M.rbf_gram(x)
    assert k[0, 1] == pytest.approx(math.exp(-1.0 / 8.0))
    assert k[0, 2] == pytest.approx(math.exp(-9.0 / 8.0))


def test_cka_matrix_matches_pairwise_and_is_symmetric():
    states = [_rand(seed=s) for s in range(3)]
    states.append(states[0] @ _orthogonal(states[0].shape[1]))
    for kern, fn in (("rbf", M.cka_rbf), ("linear", M.cka_linear)):
        m = M.cka_matrix(states, kern)
        assert torch.allclose(m, m.T)
        assert torch.allclose(m.diagonal(), torch.ones(4, dtype=torch.float64))
        for i in range(4):
            for j in range(4):
                assert m[i, j].item() == pytest.approx(fn(states[i], states[j]), abs=1e-9)
        assert m[0, 3].item() == pytest.approx(1.0, abs=1e-9)


def test_constant_state_gives_nan_not_a_crash():
    x = torch.ones(16, 4, dtype=torch.float64)
    assert math.isnan(M.cka_linear(x, _rand(n=16, d=4)))
    m = M.cka_matrix([x, _rand(n=16, d=4)], "rbf")
    assert math.isnan(m[0, 1].item()) and m[1, 1].item() == pytest.approx(1.0)


def test_effective_rank_known_cases():
    assert M.effective_rank(torch.eye(7, dtype=torch.float64)) == pytest.approx(7.0)
    u = _rand(n=20, d=1)
    assert M.effective_rank(u @ _rand(n=1, d=9).reshape(1, 9)) == pytest.approx(1.0, abs=1e-6)
    assert M.effective_rank(torch.tensor([1.0, 1.0, 0.0, 0.0])) == pytest.approx(2.0)
    # p = (0.5, 0.25, 0.25): exp(H) = exp(1.5 ln 2) = 2^1.5
    assert M.effective_rank(torch.tensor([2.0, 1.0, 1.0])) == pytest.approx(2 ** 1.5)


def test_normalized_spectrum():
    x = torch.diag(torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64))
    assert torch.allclose(M.normalized_spectrum(x), torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))
    assert M.normalized_spectrum(_rand(n=80, d=60), top=50).shape == (50,)


def test_skew_known_cases():
    h = _rand()
    assert M.skew(h, h) == 0.0
    assert M.skew(h, -h) == pytest.approx(2.0)
    assert M.skew(h, 2 * h) == pytest.approx(2.0 / 3.0)
    assert M.skew(h, torch.zeros_like(h)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="equal shapes"):
        M.skew(h, h[:-1])


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="same token count"):
        M.cka_rbf(_rand(n=10), _rand(n=11))
    with pytest.raises(ValueError, match="tokens, dim"):
        M.cka_linear(torch.zeros(3, 4, 5), torch.zeros(3, 4, 5))
