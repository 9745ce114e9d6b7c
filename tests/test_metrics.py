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


# ----------------------------------------------------------------------------- precision / recall / density / coverage


def _modes(n_modes, per_mode, seed, spread=1.0, gap=100.0):
    """per_mode 2-D Gaussian points around each of n_modes centres gap apart on a line (gap >> spread).

    Two dimensions: k-NN balls of a finite sample cover its own distribution well there, so a
    fresh sample of the same modes scores precision ~ 1 (in high dimensions it would not).
    """
    rng = np.random.default_rng(seed)
    return np.vstack([np.array([gap * i, 0.0]) + spread * rng.standard_normal((per_mode, 2)) for i in range(n_modes)])


def test_prdc_identical_sets():
    x = _rand_features(200, 16, 30)
    r = metrics.prdc(x, x.copy(), k=5)
    # Each real ball holds its centre and k - 1 strictly closer points: density exactly 1 too.
    assert r == {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}


def test_prdc_disjoint_sets_give_zero():
    x = _rand_features(150, 8, 31)
    y = _rand_features(120, 8, 32, shift=1000.0)
    assert metrics.prdc(x, y, k=5) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


@pytest.mark.parametrize("n_modes", [2, 10])
def test_prdc_fake_covering_half_the_real_modes(n_modes):
    real = _modes(n_modes, 100, seed=33)
    fake = _modes(n_modes // 2, 100, seed=34)  # a fresh sample of the first half of the modes only
    r = metrics.prdc(real, fake, k=5)
    assert r["precision"] > 0.95
    assert r["recall"] == pytest.approx(0.5, abs=0.03) and r["coverage"] == pytest.approx(0.5, abs=0.05)
    assert r["density"] == pytest.approx(1.0, abs=0.2)  # where the fakes are, they are as dense as the reals


def test_prdc_fake_collapsed_onto_one_real_point():
    real = _rand_features(100, 6, 35)
    fake = np.tile(real[17], (50, 1))
    r = metrics.prdc(real, fake, k=5)
    assert r["precision"] == 1.0
    # Zero-radius fake balls hold only real[17] itself; one real ball holds the nearest fake.
    assert r["recall"] == pytest.approx(1 / 100) and r["coverage"] <= 0.06
    assert r["density"] >= 1 / 5  # every fake sits in real[17]'s ball (and in any other holding real[17])


def test_prdc_duplicates_have_zero_radius_balls_that_hold_their_copies():
    # Every real point occurs k + 1 times: all real radii are 0. The reference implementation's
    # strict d < r would call exact copies of real points off the manifold.
    base = _rand_features(20, 4, 36)
    real = np.repeat(base, 6, axis=0)
    r = metrics.prdc(real, base[:10].copy(), k=5)
    assert r["precision"] == 1.0 and r["coverage"] == pytest.approx(0.5)
    assert r["density"] == pytest.approx(6 / 5)  # 6 copies' balls hold each fake sample
    off = metrics.prdc(real, base[:10] + 1e-3, k=5)
    assert off["precision"] == 0.0 and off["coverage"] == 0.0


def test_prdc_ties_on_a_lattice():
    # 6 x 6 integer lattice, k = 4: many neighbours sit exactly at the k-th distance, and strict
    # d < r keeps all of them out. Interior point: 4 neighbours at 1, r = 1, ball = {centre}
    # (16 points); edge point: 3 at 1, 2 at sqrt 2, r = sqrt 2, ball = centre + 3 (16 points);
    # corner: 2 at 1, 1 at sqrt 2, 2 at 2, r = 2, ball = centre + 3 (4 points). Against itself
    # (listed in another order): density = (16 * 1 + 16 * 4 + 4 * 4) / (4 * 36) = 2/3, the rest 1.
    g = np.stack(np.meshgrid(np.arange(6.0), np.arange(6.0)), axis=-1).reshape(-1, 2)
    r = metrics.prdc(g, g[::-1].copy(), k=4)
    assert r == {"precision": 1.0, "recall": 1.0, "density": pytest.approx(96 / 144, abs=1e-15), "coverage": 1.0}
    # Cell centres are sqrt(1/2) < 1 from their 4 corners: each is on the real manifold.
    shifted = metrics.prdc(g, (g + 0.5)[:25].copy(), k=4)
    assert shifted["precision"] == 1.0


def test_prdc_permutation_translation_and_scale_invariance():
    x, y = _rand_features(120, 10, 37), _rand_features(90, 10, 38, shift=0.4, scale=1.2)
    base = metrics.prdc(x, y, k=3)
    assert 0 < base["precision"] < 1 and 0 < base["recall"] < 1 and 0 < base["coverage"] < 1
    rng = np.random.default_rng(0)
    assert metrics.prdc(x[rng.permutation(120)], y[rng.permutation(90)], k=3) == base
    moved = metrics.prdc(x + 3.0, y + 3.0, k=3)
    assert moved == pytest.approx(base, abs=1.5 / 90)  # at most one boundary case may flip by round-off
    assert metrics.prdc(4.0 * x, 4.0 * y, k=3) == base  # powers of two scale exactly
    swapped = metrics.prdc(y, x, k=3)  # the roles swap: precision <-> recall
    assert swapped["precision"] == base["recall"] and swapped["recall"] == base["precision"]


def test_prdc_small_chunks_agree():
    """The row-chunked pass gives the same numbers whatever the chunk size."""
    x, y = _rand_features(80, 6, 39), _rand_features(70, 6, 40, shift=0.3)
    whole = metrics.prdc(x, y, k=4)
    for rows in (1, 7, 64):
        assert metrics.prdc(x, y, k=4, chunk_rows=rows) == whole


def test_prdc_rejects_k_too_large_and_bad_input():
    x = _rand_features(6, 3, 41)
    with pytest.raises(ValueError, match="k=6 need more than k samples.*6 real and 10 fake"):
        metrics.prdc(x, _rand_features(10, 3, 42), k=6)
    with pytest.raises(ValueError, match="k=5"):
        metrics.prdc(_rand_features(10, 3, 42), x[:5], k=5)
    with pytest.raises(ValueError, match="k=0"):
        metrics.prdc(x, x, k=0)
    with pytest.raises(ValueError, match="dimensions differ"):
        metrics.prdc(x, np.zeros((8, 4)), k=2)
    with pytest.raises(ValueError, match="NaN"):
        metrics.prdc(x, np.full((8, 3), np.nan), k=2)


def test_prdc_agrees_with_reference_implementation():
    """The `prdc` package (Naeem et al.'s code; not a dependency) on tie-free data."""
    ref = pytest.importorskip("prdc")
    x, y = _rand_features(200, 20, 43), _rand_features(180, 20, 44, shift=0.3, scale=0.9)
    for k in (1, 3, 5):
        want = ref.compute_prdc(real_features=x, fake_features=y, nearest_k=k)
        assert metrics.prdc(x, y, k=k) == pytest.approx({key: float(v) for key, v in want.items()}, abs=1e-12)
