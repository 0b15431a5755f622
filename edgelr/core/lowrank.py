"""The linear algebra of data-aware low-rank factorization (numpy only, no graph here).

W is (out x in). With H = sum x x^T the Gram matrix of the layer's inputs and L its Cholesky factor
(H = L L^T), the output error of an approximation is ||(W - W_r) X||_F = ||(W - W_r) L||_F. So the best
rank-r approximation in that norm comes from the SVD of W L (SVD-LLM's truncation-aware whitening):
W L = U S V^T, W_r = U_r S_r V_r^T L^-1, and dropping singular value s_i costs exactly s_i^2.
Without data, L = I and this is the plain SVD.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg


def cholesky_factor(gram: np.ndarray, damping: float) -> np.ndarray:
    """Lower-triangular L with L L^T = gram + damping * mean(diag) * I (damped so dead inputs are fine).

    Factorized in place in one float64 copy of the Gram (its transpose is the Fortran-ordered view LAPACK
    wants, and the matrix is symmetric): no identity, sum or layout copies, which for a wide layer are
    each as large as that copy."""
    scale = float(np.mean(np.diag(gram))) or 1.0
    for extra in (damping, 1e-4, 1e-2, 1e-1):
        h = np.array(gram, dtype=np.float64)  # fresh each try: a failed factorization leaves it spoilt
        h[np.diag_indices_from(h)] += max(extra, damping) * scale
        try:
            return scipy.linalg.cholesky(h.T, lower=True, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("the calibration Gram matrix is not positive definite even after damping")


FEW_ROWS = 4  # a Gram summed over fewer input rows than this many times its width is poorly determined


def adapted_damping(damping: float, gram: np.ndarray, rows: int | None) -> float:
    """The damping for a Gram summed over `rows` input rows (None: unknown, `damping` as given).

    A Gram from few rows per input dimension whitens towards directions that those rows happen to
    span: the factors fit the calibration samples and little else. Oracle Approximating Shrinkage
    (Chen et al. 2010) estimates, from the Gram and its row count alone, how far the sample second
    moment S should shrink towards mean(diag S) I; (1 - rho) S + rho mean(diag S) I is, up to scale,
    the Gram damped by rho / (1 - rho) of its mean diagonal: towards plain SVD as the rows run out."""
    if not rows:
        return damping
    k = len(gram)
    s = np.asarray(gram, dtype=np.float64) / rows
    trace, trace2 = float(np.trace(s)), float(np.sum(s * s))
    spread = trace2 - trace * trace / k  # zero when S is already a multiple of I: nothing to shrink
    if k < 2 or spread <= 0:
        return damping
    rho = min(1.0, ((1 - 2 / k) * trace2 + trace * trace) / ((rows + 1 - 2 / k) * spread))
    return max(damping, rho / max(1.0 - rho, 1e-3))


def spatial_gram(gram: np.ndarray, in_channels: int, kernel: tuple[int, int]) -> np.ndarray:
    """The Gram of vertical (c, i) patches from the full (c, i, j) im2col Gram, summed over columns j.

    Exact for the spatial (kh x 1, 1 x kw) form when patches in different columns are uncorrelated;
    the real error of the chosen factors is measured afterwards with the full Gram.
    """
    kh, kw = kernel
    g = gram.reshape(in_channels, kh, kw, in_channels, kh, kw)
    return np.einsum("cijdkj->cidk", g).reshape(in_channels * kh, in_channels * kh)


def residual_fraction(sigma: np.ndarray) -> np.ndarray:
    """r -> relative output error^2 of keeping the first r singular values, for r = 0..len(sigma)."""
    energy = sigma.astype(np.float64) ** 2
    total = energy.sum()
    if total == 0:
        return np.zeros(len(sigma) + 1)
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    return tail / total


@dataclass
class Factors:
    """W ~ up @ down: down (rank x in) runs first, up (out x rank) second."""

    up: np.ndarray
    down: np.ndarray

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def decompose(w: np.ndarray, chol: np.ndarray | None, keep: int) -> tuple[np.ndarray, Factors | None]:
    """All singular values of W L (W without data), descending, and the best rank-`keep` factors in
    the data-whitened norm (None when keep is 0), with sqrt(S) on each side.

    Computed from the eigendecomposition of the smaller Gram of W L (float64): several times faster
    than an SVD of a tall matrix; squaring the condition number is harmless, since only the leading
    directions, far above round-off, are kept.
    """
    a = w if chol is None else w @ chol
    tall = a.shape[0] >= a.shape[1]
    small = a.T @ a if tall else a @ a.T
    if keep == 0:
        values = scipy.linalg.eigvalsh(small, check_finite=False, driver="evd")[::-1]
        return np.sqrt(np.clip(values, 0, None)), None
    values, vectors = scipy.linalg.eigh(small, check_finite=False, driver="evd")  # evr stalls on some spectra
    sigma = np.sqrt(np.clip(values[::-1], 0, None))
    s, vectors = sigma[:keep], vectors[:, ::-1][:, :keep]
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > s[0] * 1e-12)
    if tall:  # a = U S V^T with V from a^T a; U = a V / S
        u, vt = (a @ vectors) * inv, vectors.T
    else:
        u, vt = vectors, ((a.T @ vectors) * inv).T
    root = np.sqrt(s)
    up, down = u * root, root[:, None] * vt
    if chol is not None:  # down = S^1/2 V^T L^-1  <=>  L^T down^T = V S^1/2
        down = scipy.linalg.solve_triangular(chol, down.T, trans="T", lower=True, check_finite=False).T
    return sigma, Factors(up=up, down=down)


def relative_error(w: np.ndarray, approx: np.ndarray, gram: np.ndarray | None) -> float:
    """||(W - approx) X|| / ||W X|| measured with the (undamped) Gram, or on the weights without data."""
    delta = w - approx
    if gram is None:
        denom = np.sum(w * w)
        return float(np.sqrt(np.sum(delta * delta) / denom)) if denom > 0 else 0.0
    num = np.sum((delta @ gram) * delta)
    denom = np.sum((w @ gram) * w)
    return float(np.sqrt(max(num, 0.0) / denom)) if denom > 0 else 0.0
