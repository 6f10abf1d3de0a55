"""Representation-similarity and spectrum math on one sample's state matrices X [n_tokens, dim].

Choices (the paper does not state them; docs/paper.md §6):
- CKA treats tokens as examples (Kornblith et al. 2019): CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with the
  biased HSIC estimator, i.e. <HKH, HLH>_F / (||HKH||_F ||HLH||_F), H the centring matrix.
- RBF kernel K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2)), sigma^2 = median of the squared distances over distinct token
  pairs i < j (Kornblith's reference code takes the median over the full matrix incl. the zero diagonal; excluding it
  keeps the bandwidth independent of the diagonal's share, which matters for short sequences).
- Linear CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc.
- Spectrum: singular values of the *uncentred* state matrix, normalised by the largest (sigma_i / sigma_0).
- Effective rank: entropy effective rank (Roy & Vetterli 2007), exp(H(p)) with p_i = sigma_i / sum_j sigma_j.
- Skew ("computation skew", relative update norm) of a block f: r = 2 ||f(h) - h||_F / (||f(h)||_F + ||h||_F),
  in [0, 2]: 0 = the block did nothing, 2 = output opposite to input.
All math runs in float64.
"""

from __future__ import annotations

import torch

_EPS = 1e-12


def _as64(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"expected a [tokens, dim] matrix, got shape {tuple(x.shape)}")
    return x.detach().to(torch.float64)


def center_gram(k: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11^T/n (double centring)."""
    k = k - k.mean(dim=0, keepdim=True)
    return k - k.mean(dim=1, keepdim=True)


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    x = _as64(x)
    sq = (x * x).sum(dim=1)
    d = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    return d.clamp_min(0.0)


def rbf_bandwidth(sq_dist: torch.Tensor) -> float:
    """sigma^2 = median squared distance over distinct pairs."""
    n = sq_dist.shape[0]
    if n < 2:
        raise ValueError("RBF CKA needs at least 2 tokens")
    iu = torch.triu_indices(n, n, offset=1, device=sq_dist.device)
    return float(sq_dist[iu[0], iu[1]].median())


def rbf_gram(x: torch.Tensor) -> torch.Tensor:
    d = squared_distances(x)
    sigma2 = rbf_bandwidth(d)
    if sigma2 <= 0.0:  # all tokens identical (or nearly): the kernel is constant, centred to zero
        return torch.ones_like(d)
    return torch.exp(-d / (2.0 * sigma2))


def linear_gram(x: torch.Tensor) -> torch.Tensor:
    x = _as64(x)
    return x @ x.T


def cka_from_centered(kc: torch.Tensor, lc: torch.Tensor) -> float:
    num = (kc * lc).sum()
    den = torch.linalg.norm(kc) * torch.linalg.norm(lc)
    return float(num / den) if den > _EPS else float("nan")


def cka_rbf(x: torch.Tensor, y: torch.Tensor) -> float:
    _check_pair(x, y)
    return cka_from_centered(center_gram(rbf_gram(x)), center_gram(rbf_gram(y)))


def cka_linear(x: torch.Tensor, y: torch.Tensor) -> float:
    """Feature-space form (cheap when dim << tokens is not needed: both forms are exact)."""
    _check_pair(x, y)
    xc = _as64(x) - _as64(x).mean(dim=0, keepdim=True)
    yc = _as64(y) - _as64(y).mean(dim=0, keepdim=True)
    num = torch.linalg.norm(yc.T @ xc) ** 2
    den = torch.linalg.norm(xc.T @ xc) * torch.linalg.norm(yc.T @ yc)
    return float(num / den) if den > _EPS else float("nan")


def cka_matrix(states: list[torch.Tensor], kernel: str = "rbf") -> torch.Tensor:
    """All-pairs CKA [n, n] between one sample's states; each centred Gram is built once."""
    for s in states[1:]:
        _check_pair(states[0], s)
    gram = rbf_gram if kernel == "rbf" else linear_gram if kernel == "linear" else None
    if gram is None:
        raise ValueError(f"kernel must be 'rbf' or 'linear', got {kernel!r}")
    g = torch.stack([center_gram(gram(s)).flatten() for s in states])  # [n, tokens^2]
    inner = g @ g.T
    norms = inner.diagonal().clamp_min(0.0).sqrt()
    den = norms[:, None] * norms[None, :]
    out = inner / den
    out[den <= _EPS] = float("nan")
    return out


def singular_values(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(_as64(x))


def normalized_spectrum(x: torch.Tensor, top: int = 50) -> torch.Tensor:
    """sigma_i / sigma_0 for the top `top` singular values (fewer if the matrix has lower rank)."""
    s = singular_values(x)[:top]
    return s / s[0] if s[0] > _EPS else torch.zeros_like(s)


def effective_rank(x_or_sv: torch.Tensor) -> float:
    """Entropy effective rank; accepts a matrix or a vector of singular values."""
    s = singular_values(x_or_sv) if x_or_sv.dim() == 2 else x_or_sv.detach().to(torch.float64)
    total = s.sum()
    if total <= _EPS:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def skew(h_in: torch.Tensor, h_out: torch.Tensor) -> float:
    """r = 2 ||f(h) - h||_F / (||f(h)||_F + ||h||_F)."""
    if h_in.shape != h_out.shape:
        raise ValueError(f"skew needs equal shapes, got {tuple(h_in.shape)} and {tuple(h_out.shape)}")
    a, b = h_in.detach().to(torch.float64), h_out.detach().to(torch.float64)
    den = torch.linalg.norm(b) + torch.linalg.norm(a)
    return float(2.0 * torch.linalg.norm(b - a) / den) if den > _EPS else 0.0


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs [tokens, dim] matrices with the same token count, got {tuple(x.shape)} and {tuple(y.shape)}")
