"""Known-answer tests of the metric math (medsynth/metrics.py): closed forms and invariances."""

from __future__ import annotations

import numpy as np
import pytest

from medsynth import metrics


def _rand_features(n, d, seed, shift=0.0, scale=1.0):
    """n samples of one correlated Gaussian per d (fixed mixing matrix), shifted / scaled."""
    a = np.random.default_rng(d).standard_normal((d, d)) / np.sqrt(d)
    return (np.random.default_rng(seed).standard_normal((n, d)) @ a) * scale + shift


def _random_spd(d, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_identical_sets_give_zero():
    x = _rand_features(300, 32, 0)
    assert metrics.frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-9)
    mu, s = metrics.feature_stats(x)
    # Scale of the terms that cancel: the result is zero to round-off relative to them.
    assert metrics.frechet_distance(mu, s, mu, s) <= 1e-10 * np.trace(s)


def test_equal_covariances_give_squared_mean_distance():
    d = 16
    s = _random_spd(d, 1)
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = float(np.sum((mu1 - mu2) ** 2))
    assert metrics.frechet_distance(mu1, s, mu2, s) == pytest.approx(expected, rel=1e-10)


def test_diagonal_closed_form():
    # For diagonal covariances tr((S1 S2)^1/2) = sum sqrt(a_i b_i), so
    # d^2 = ||mu1 - mu2||^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(3)
    d = 50
    a, b = rng.uniform(0.01, 4.0, d), rng.uniform(0.01, 4.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_singular_covariance_closed_form():
    # Rank-deficient (n < d) covariances: zero eigenvalues must not produce NaN or negative values.
    a = np.array([2.0, 0.0, 1.0, 0.0])
    b = np.array([0.5, 3.0, 0.0, 0.0])
    expected = float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    assert metrics.frechet_distance(np.zeros(4), np.diag(a), np.zeros(4), np.diag(b)) == pytest.approx(expected, rel=1e-12)
    x, y = _rand_features(20, 64, 4), _rand_features(25, 64, 5, shift=0.3)
    v = metrics.frechet_distance_features(x, y)
    assert np.isfinite(v) and v > 0


@pytest.mark.parametrize("a", [0.1, 3.0, -2.0])
def test_scaling_both_sets_scales_by_a_squared(a):
    x, y = _rand_features(200, 24, 6), _rand_features(180, 24, 7, shift=0.5, scale=1.3)
    base = metrics.frechet_distance_features(x, y)
    assert metrics.frechet_distance_features(a * x, a * y) == pytest.approx(a * a * base, rel=1e-9)


def test_translation_invariance_and_symmetry():
    x, y = _rand_features(150, 20, 8), _rand_features(170, 20, 9, shift=1.0)
    base = metrics.frechet_distance_features(x, y)
    assert metrics.frechet_distance_features(x + 5.0, y + 5.0) == pytest.approx(base, rel=1e-9)
    assert metrics.frechet_distance_features(y, x) == pytest.approx(base, rel=1e-9)


def test_feature_path_without_covariances_matches_covariance_path():
    # n < d: frechet_distance_features uses the nuclear norm of X1 X2^T instead of d x d covariances.
    x, y = _rand_features(30, 80, 22), _rand_features(45, 80, 23, shift=0.3, scale=0.8)
    mu1, s1 = metrics.feature_stats(x)
    mu2, s2 = metrics.feature_stats(y)
    assert metrics.frechet_distance_features(x, y) == pytest.approx(metrics.frechet_distance(mu1, s1, mu2, s2), rel=1e-9)
    assert metrics.frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-9)
    # singular S1 (30 samples, 80 dims): the eigendecomposition fallback agrees with the Cholesky of S2 order
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(metrics.frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_matches_scipy_sqrtm_formula_on_well_conditioned_input():
    from scipy import linalg

    s1, s2 = _random_spd(40, 10), _random_spd(40, 11)
    mu1, mu2 = np.ones(40), np.zeros(40)
    covmean = linalg.sqrtm(s1 @ s2).real
    ref = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)


def test_kid_of_two_constant_sets_matches_closed_form():
    # x_i = u for all i, y_j = v for all j: every kernel value is constant, so
    # MMD^2_u = k(u,u) + k(v,v) - 2 k(u,v) exactly, in every subset (std 0).
    d = 8
    u, v = np.full(d, 0.5), np.linspace(-1, 1, d)
    x, y = np.tile(u, (30, 1)), np.tile(v, (40, 1))

    def k(p, q):
        return (p @ q / d + 1.0) ** 3

    expected = k(u, u) + k(v, v) - 2 * k(u, v)
    mean, std, m = metrics.kid(x, y, subset_size=1000, subsets=5, seed=0)
    assert m == 30
    assert mean == pytest.approx(expected, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_same_distribution_near_zero_and_seeded():
    x, y = _rand_features(400, 16, 12), _rand_features(400, 16, 13)
    z = _rand_features(400, 16, 14, shift=1.0)
    same = metrics.kid(x, y, 100, 20, seed=1)
    diff = metrics.kid(x, z, 100, 20, seed=1)
    assert abs(same[0]) < 3 * same[1] + 1e-3
    assert diff[0] > 10 * abs(same[0])
    assert metrics.kid(x, y, 100, 20, seed=1) == same  # deterministic for a seed
    assert metrics.kid(x, y, 100, 20, seed=2) != same


def test_kid_rejects_too_few_samples():
    with pytest.raises(ValueError, match="at least 2"):
        metrics.kid(np.zeros((1, 3)), np.zeros((5, 3)))


def test_agrees_with_torch_fidelity():
    torch = pytest.importorskip("torch")
    fid_mod = pytest.importorskip("torch_fidelity.metric_fid")
    kid_mod = pytest.importorskip("torch_fidelity.metric_kid")
    x, y = _rand_features(300, 64, 15), _rand_features(250, 64, 16, shift=0.2, scale=1.1)
    st1 = fid_mod.fid_features_to_statistics(torch.from_numpy(x))
    st2 = fid_mod.fid_features_to_statistics(torch.from_numpy(y))
    ref = fid_mod.fid_statistics_to_metric(st1, st2, verbose=False)[fid_mod.KEY_METRIC_FID]
    assert metrics.frechet_distance_features(x, y) == pytest.approx(ref, rel=1e-6)
    # One subset holding every sample: MMD^2 is permutation invariant, so sampling cannot differ.
    n = 250
    kref = kid_mod.kid_features_to_metric(torch.from_numpy(x[:n]), torch.from_numpy(y), kid_subsets=1,
                                          kid_subset_size=n, rng_seed=0, verbose=False)
    assert metrics.mmd2_unbiased(x[:n], y) == pytest.approx(kref[kid_mod.KEY_METRIC_KID_MEAN], rel=1e-6)
    assert metrics.kid(x[:n], y, n, 1)[0] == pytest.approx(kref[kid_mod.KEY_METRIC_KID_MEAN], rel=1e-6)


def test_agrees_with_torchmetrics():
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics.image.fid")
    x, y = _rand_features(300, 48, 17), _rand_features(280, 48, 18, shift=-0.4)
    mu1, s1 = metrics.feature_stats(x)
    mu2, s2 = metrics.feature_stats(y)
    ref = float(tm._compute_fid(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2))))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)


def test_nearest_cosine_finds_copies():
    ref = _rand_features(50, 10, 19) + 3.0  # non-negative-ish, like post-ReLU features
    query = np.vstack([ref[7], ref[21] * 1.0001, _rand_features(3, 10, 20) + 3.0])
    sims, idx = metrics.nearest_cosine(query, ref, center=ref.mean(axis=0))
    assert idx[0] == 7 and sims[0] == pytest.approx(1.0)
    assert idx[1] == 21 and sims[1] > 0.999
    assert (sims[2:] < 0.99).all()


def test_wasserstein1_hist_matches_scipy():
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(21)
    h1, h2 = rng.integers(0, 50, 256).astype(float), rng.integers(0, 50, 256).astype(float)
    vals = np.arange(256) / 255.0
    ref = wasserstein_distance(vals, vals, u_weights=h1, v_weights=h2)
    assert metrics.wasserstein1_hist(h1, h2, 1 / 255.0) == pytest.approx(ref, rel=1e-9)
