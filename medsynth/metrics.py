"""Distribution metrics on feature vectors: Fréchet distance, KID, nearest neighbours, colour distances.

Pure float64 NumPy math, separate from feature extraction (medsynth/features.py), so every
formula can be checked against closed forms (tests/test_metrics.py).

Fréchet distance (FID when the features are FID-Inception pool features) between Gaussians
N(mu1, S1) and N(mu2, S2)::

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

The trace of the matrix square root is computed from eigenvalues instead of
``scipy.linalg.sqrtm`` (which is slow, can return complex values with large imaginary
parts on near-singular covariances, and whose ``disp`` argument is gone in current SciPy).
S1 S2 has the same eigenvalues as the symmetric A = B^T S2 B for any B with B B^T = S1
(eig(B B^T S2) = eig(B^T S2 B) since XY and YX share their eigenvalues), and A is positive
semi-definite, so::

    tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(A)),   A = B^T S2 B,  B B^T = S1

with B = the Cholesky factor L1 of S1 when S1 is positive definite (fast: one Cholesky,
two triangular matrix products, one symmetric eigenvalue solve without eigenvectors), else
B = V diag(sqrt(w)) from the eigendecomposition S1 = V diag(w) V^T (works for singular S1,
e.g. fewer samples than feature dimensions). Eigenvalues below the round-off level
d * eps * lambda_max (including slightly negative ones) are set to 0: they are 0 in exact
arithmetic for rank-deficient PSD matrices, and sqrt would turn round-off into bias.

From features directly (``frechet_distance_features``) with n1, n2 samples and centred
feature matrices X1, X2 (S_i = X_i^T X_i / (n_i - 1)), when the sets are smaller than the
feature dimension the d x d covariances are never formed::

    tr((S1 S2)^(1/2)) = ||X1 X2^T||_* / sqrt((n1 - 1)(n2 - 1))      (nuclear norm)

since the non-zero eigenvalues of X1^T X1 X2^T X2 are the squared singular values of X1 X2^T.

KID (Binkowski et al. 2018): unbiased estimate of the squared MMD with the cubic polynomial
kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets of size m::

    MMD^2_u = 1/(m(m-1)) sum_{i!=j} k(x_i,x_j) + 1/(m(m-1)) sum_{i!=j} k(y_i,y_j)
              - 2/m^2 sum_{i,j} k(x_i,y_j)

Precision / recall / density / coverage (``prdc``) are defined there.
"""

from __future__ import annotations

import numpy as np


def _as_features(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (n_samples, n_features), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: features contain NaN or infinite values")
    return a


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, ddof=1) of ``features`` (n, d) in float64."""
    f = _as_features(features, "features")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {f.shape[0]}")
    mu = f.mean(axis=0)
    sigma = np.cov(f, rowvar=False, ddof=1).reshape(f.shape[1], f.shape[1])
    return mu, sigma


def trace_sqrt_product(sigma1, sigma2) -> float:
    """tr((S1 S2)^(1/2)) = sum sqrt(eig(B^T S2 B)), B B^T = S1, for symmetric PSD S1, S2."""
    s1 = np.asarray(sigma1, dtype=np.float64)
    s2 = np.asarray(sigma2, dtype=np.float64)
    s1 = (s1 + s1.T) / 2.0  # symmetrise away round-off so the symmetric solvers' assumption holds
    s2 = (s2 + s2.T) / 2.0
    try:
        low = np.linalg.cholesky(s1)
    except np.linalg.LinAlgError:  # singular S1 (e.g. n <= d): factor through its eigendecomposition
        w, v = np.linalg.eigh(s1)
        b = v * np.sqrt(np.clip(w, 0.0, None))
        a = b.T @ (s2 @ b)
    else:
        from scipy.linalg.blas import dtrmm  # triangular products: half the flops of a dense matmul

        a = dtrmm(1.0, low, dtrmm(1.0, low, s2, side=1, lower=1), side=0, lower=1, trans_a=1)
    w = np.linalg.eigvalsh((a + a.T) / 2.0)
    # Eigenvalues below the round-off level of the largest are 0 in exact arithmetic (rank-deficient
    # covariances); left in, each would add sqrt(round-off) ~ 1e-8 * scale to the trace.
    w[w < w.max(initial=0.0) * w.shape[0] * np.finfo(np.float64).eps] = 0.0
    return float(np.sqrt(w).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet distance between N(mu1, S1) and N(mu2, S2) (see module docstring).

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 sum_i sqrt(lambda_i(S1^(1/2) S2 S1^(1/2)))
    Computed in float64; a result that round-off makes slightly negative is returned as 0.
    """
    mu1 = np.asarray(mu1, dtype=np.float64).ravel()
    mu2 = np.asarray(mu2, dtype=np.float64).ravel()
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu2.shape[0] != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))
    return max(value, 0.0)


def frechet_distance_features(x, y) -> float:
    """Fréchet distance between the Gaussians fitted to feature sets x (n1, d) and y (n2, d).

    Uses the nuclear-norm form (module docstring) when max(n1, n2) < d, else the covariances.
    """
    x = _as_features(x, "x")
    y = _as_features(y, "y")
    n1, n2, d = x.shape[0], y.shape[0], x.shape[1]
    if y.shape[1] != d:
        raise ValueError(f"feature dimensions differ: {d} vs {y.shape[1]}")
    if min(n1, n2) < 2:
        raise ValueError(f"need at least 2 samples per set, got {n1} and {n2}")
    if max(n1, n2) >= d:
        mu1, s1 = feature_stats(x)
        mu2, s2 = feature_stats(y)
        return frechet_distance(mu1, s1, mu2, s2)
    mu1, mu2 = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mu1, y - mu2
    diff = mu1 - mu2
    tr1 = float((xc * xc).sum()) / (n1 - 1)
    tr2 = float((yc * yc).sum()) / (n2 - 1)
    nuclear = float(np.linalg.svd(xc @ yc.T, compute_uv=False).sum())
    value = float(diff @ diff + tr1 + tr2 - 2.0 * nuclear / np.sqrt((n1 - 1) * (n2 - 1)))
    return max(value, 0.0)


def polynomial_kernel(x, y, degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> np.ndarray:
    """k(x, y) = (gamma x.y + coef0)^degree with gamma = 1/d by default (KID's kernel)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    g = 1.0 / x.shape[1] if gamma is None else gamma
    return (g * (x @ y.T) + coef0) ** degree


def mmd2_unbiased(x, y) -> float:
    """Unbiased MMD^2 between samples x (m, d) and y (n, d) with the cubic polynomial kernel.

    MMD^2_u = mean_{i!=j} k(x_i,x_j) + mean_{i!=j} k(y_i,y_j) - 2 mean_{i,j} k(x_i,y_j)
    (the form above generalises KID's equal-size formula to m != n).
    """
    x = _as_features(x, "x")
    y = _as_features(y, "y")
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {m} and {n}")
    kxx = polynomial_kernel(x, x)
    kyy = polynomial_kernel(y, y)
    kxy = polynomial_kernel(x, y)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kid(x, y, subset_size: int = 1000, subsets: int = 100, seed: int = 0) -> tuple[float, float, int]:
    """Kernel Inception Distance: mean and std of unbiased MMD^2 over random subsets.

    Each of ``subsets`` draws picks min(subset_size, n_x, n_y) rows of x and of y without
    replacement, with a NumPy generator seeded by ``seed`` (same inputs + seed = same value).
    Returns (mean, std, subset size used); std is the population std over subsets (0 for one).
    """
    x = _as_features(x, "x")
    y = _as_features(y, "y")
    m = int(min(subset_size, x.shape[0], y.shape[0]))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {x.shape[0]} and {y.shape[0]}")
    rng = np.random.default_rng(seed)
    vals = np.empty(subsets, dtype=np.float64)
    for i in range(subsets):
        xi = x[rng.choice(x.shape[0], m, replace=False)]
        yi = y[rng.choice(y.shape[0], m, replace=False)]
        vals[i] = mmd2_unbiased(xi, yi)
    return float(vals.mean()), float(vals.std()), m


def nearest_cosine(query, reference, center=None) -> tuple[np.ndarray, np.ndarray]:
    """For every row of ``query`` its most cosine-similar row of ``reference``.

    With ``center`` (a (d,) vector, e.g. the reference mean) both sets are centred first:
    post-ReLU network features are all non-negative, so raw cosines between unrelated images
    sit near 1 and say little; after centring, unrelated images score near 0 and near-copies
    near 1. Returns (similarity (n,), index (n,)).
    """
    q = _as_features(query, "query")
    r = _as_features(reference, "reference")
    if center is not None:
        c = np.asarray(center, dtype=np.float64)
        q = q - c
        r = r - c
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    rn = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    sims = np.empty(q.shape[0])
    idx = np.empty(q.shape[0], dtype=np.int64)
    for s in range(0, q.shape[0], 1024):  # bounded memory for large sets
        block = qn[s:s + 1024] @ rn.T
        idx[s:s + 1024] = block.argmax(axis=1)
        sims[s:s + 1024] = block[np.arange(block.shape[0]), idx[s:s + 1024]]
    return sims, idx


def wasserstein1_hist(h1, h2, bin_width: float) -> float:
    """Wasserstein-1 distance between two histograms on the same equal-width bins.

    W1 = bin_width * sum_k |CDF1_k - CDF2_k| (exact for distributions concentrated on bin
    centres); histograms are normalised to probability first.
    """
    a = np.asarray(h1, dtype=np.float64)
    b = np.asarray(h2, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"histograms differ in shape: {a.shape} vs {b.shape}")
    if a.sum() <= 0 or b.sum() <= 0:
        raise ValueError("empty histogram")
    return float(bin_width * np.abs(np.cumsum(a / a.sum()) - np.cumsum(b / b.sum())).sum())


def prdc(real, fake, k: int = 5, chunk_rows: int | None = None) -> dict:
    """Precision, recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020).

    Real samples X = {x_i} (n), fake samples Y = {y_j} (m), Euclidean distances d. Each sample
    gets a k-NN ball B(x, r_k(x)), r_k(x) = distance from x to its k-th nearest neighbour in its
    own set, the sample itself excluded (a duplicate of x counts as a neighbour at distance 0)::

        precision = 1/m sum_j 1[ y_j in U_i B(x_i, r_k(x_i)) ]     fake samples on the real manifold
        recall    = 1/n sum_i 1[ x_i in U_j B(y_j, r_k(y_j)) ]     real samples on the fake manifold
        density   = 1/(k m) sum_j sum_i 1[ y_j in B(x_i, r_k(x_i)) ]
        coverage  = 1/n sum_i 1[ nn_Y(x_i) in B(x_i, r_k(x_i)) ]     nn_Y(x) = the fake sample nearest to x

    Density and coverage use only the real balls, so a few outlying real samples do not inflate
    them the way they inflate precision; density is not bounded by 1 (fake samples packed where
    real ones are dense score > 1). For two independent samples of one distribution E[density] = 1.

    Ball membership: ``y in B(x, r)`` iff d(x, y) < r or d(x, y) = 0. The strict inequality is the
    one of the published reference implementation (Naeem et al.'s code, which dgm-eval copies), so
    values agree with it on data without ties, and a set compared with itself gets precision =
    recall = coverage = density = 1 (each ball holds its centre and k - 1 strictly closer points).
    The d = 0 clause makes a ball always hold its centre: a point with >= k exact duplicates has
    radius 0, and its copies still count as on the manifold (the reference counts them as off).

    Distances: float64 squared-norm expansion |a|^2 + |b|^2 - 2 a.b (sklearn's
    ``euclidean_distances``, BLAS matrix products), in row chunks of bounded memory. The expansion
    does not give exactly 0 for identical points, nor bitwise-equal values for equal distances
    computed at different matrix positions; both matter for ties and duplicates. So the distances
    are computed between the *distinct* rows of real + fake (``np.unique``), the self-distance of
    each distinct row is set to 0, and every pair of samples reads the one entry of its two
    distinct rows: identical samples in either set behave identically and ties stay ties.

    Cost: (number of distinct rows) x (n + m) distances of dimension d, ``chunk_rows`` distinct rows
    at a time (default: blocks of about 32 MiB). Returns plain floats.
    Raises ValueError when k < 1 or k >= n or k >= m (each sample needs k other samples).
    """
    from sklearn.metrics.pairwise import euclidean_distances

    x = _as_features(real, "real")
    y = _as_features(fake, "fake")
    n, m = x.shape[0], y.shape[0]
    if y.shape[1] != x.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    k = int(k)
    if k < 1 or k >= n or k >= m:
        raise ValueError(f"precision/recall/density/coverage with k={k} need more than k samples in each set "
                         f"(k-th neighbour of each sample among the others); got {n} real and {m} fake; "
                         f"use a k below {min(n, m)} or more samples")
    uniq, inv = np.unique(np.vstack([x, y]), axis=0, return_inverse=True)
    inv = inv.ravel()
    inv_r, inv_f = inv[:n], inv[n:]
    count_r = np.bincount(inv_r, minlength=uniq.shape[0])
    count_f = np.bincount(inv_f, minlength=uniq.shape[0])
    sq = np.einsum("ij,ij->i", uniq, uniq)

    precise = np.zeros(m, dtype=bool)  # fake j inside some real ball
    density_hits = np.zeros(m, dtype=np.float64)  # number of real balls (with multiplicity) holding fake j
    recalled = np.zeros(n, dtype=bool)  # real i inside some fake ball
    covered = np.zeros(uniq.shape[0], dtype=bool)  # distinct real row whose ball holds its nearest fake

    u = uniq.shape[0]
    chunk = chunk_rows or max(1, min(u, (1 << 22) // max(1, u + n + m)))  # ~32 MiB per float64 block
    for s in range(0, u, chunk):
        e = min(u, s + chunk)
        dist = euclidean_distances(uniq[s:e], uniq, X_norm_squared=sq[s:e, None], Y_norm_squared=sq[None, :])
        dist[np.arange(e - s), np.arange(s, e)] = 0.0
        to_r, to_f = dist[:, inv_r], dist[:, inv_f]  # (rows, n), (rows, m): one entry per sample
        is_r, is_f = count_r[s:e] > 0, count_f[s:e] > 0
        if is_r.any():
            d_rf = to_f[is_r]
            # (k+1)-th smallest of the row over the real set = k-th neighbour, the row's own zero skipped.
            rad = np.partition(to_r[is_r], k, axis=1)[:, k]
            inside = (d_rf < rad[:, None]) | (d_rf == 0.0)
            precise |= inside.any(axis=0)
            density_hits += count_r[s:e][is_r] @ inside
            covered[np.arange(s, e)[is_r]] = inside.any(axis=1)
        if is_f.any():
            d_fr = to_r[is_f]
            rad = np.partition(to_f[is_f], k, axis=1)[:, k]
            recalled |= ((d_fr < rad[:, None]) | (d_fr == 0.0)).any(axis=0)
    return {"precision": float(precise.mean()), "recall": float(recalled.mean()),
            "density": float(density_hits.sum() / (k * m)), "coverage": float(covered[inv_r].mean())}
