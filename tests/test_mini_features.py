"""The miniature reproduction's distribution metric: FD-patch / KD-patch in the features of the project's own
``PatchFeatureNet`` (``benchmarks/mini/features.py``). Closed-form checks of the two distances, a tiny deterministic
training run, and the committed network (``benchmarks/mini/featnet``): loads, 256-d features, blur moves the metric."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "mini"))

import features  # noqa: E402

COMMITTED = REPO / "benchmarks" / "mini" / "featnet"


def _exact_gaussian_sample(n: int, d: int, cov: np.ndarray, seed: int) -> np.ndarray:
    """``n`` points whose sample mean is exactly 0 and sample covariance (ddof 1) exactly ``cov``."""
    z = np.random.default_rng(seed).standard_normal((n, d))
    z -= z.mean(0)
    w, v = np.linalg.eigh(np.cov(z, rowvar=False))
    z = z @ (v / np.sqrt(w)) @ v.T  # whitened: sample covariance I
    return z @ np.linalg.cholesky(cov).T


# ------------------------------------------------------------------------------------------------------ Fréchet
def test_frechet_identical_sets_is_zero():
    f = np.random.default_rng(0).standard_normal((300, 32)) * np.linspace(0.1, 3, 32)
    assert abs(features.frechet_distance(f, f)) < 1e-8
    assert abs(features.frechet_distance(f, f[::-1].copy())) < 1e-8  # order does not matter


def test_frechet_shifted_gaussians_equals_squared_shift():
    d = 16
    a = np.random.default_rng(1).standard_normal((d, d))
    cov = a @ a.T / d + 0.1 * np.eye(d)
    x = _exact_gaussian_sample(400, d, cov, seed=2)
    np.testing.assert_allclose(np.cov(x, rowvar=False), cov, atol=1e-10)
    shift = np.random.default_rng(3).standard_normal(d)
    assert features.frechet_distance(x, x + shift) == pytest.approx(shift @ shift, rel=1e-7, abs=1e-7)
    # samples of the same law (not identical points): close to ||shift||^2, the covariance term only adds noise
    y = np.random.default_rng(4).multivariate_normal(shift, cov, size=20000)
    z = np.random.default_rng(5).multivariate_normal(np.zeros(d), cov, size=20000)
    assert features.frechet_distance(z, y) == pytest.approx(shift @ shift, rel=0.05)


def test_frechet_from_stats_closed_forms():
    # diagonal (commuting) covariances: ||dmu||^2 + sum (sqrt a - sqrt b)^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert features.frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)
    # general (non-commuting) covariances: the textbook formula with scipy's sqrtm
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(6)
    p, q = rng.standard_normal((8, 8)), rng.standard_normal((8, 8))
    s1, s2 = p @ p.T + 0.5 * np.eye(8), q @ q.T + 0.5 * np.eye(8)
    m1, m2 = rng.standard_normal(8), rng.standard_normal(8)
    ref = (m1 - m2) @ (m1 - m2) + np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2)))
    assert features.frechet_distance_from_stats(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-8)
    # rank-deficient (few samples, many dimensions) stays real and finite
    f1, f2 = rng.standard_normal((10, 64)), rng.standard_normal((12, 64)) + 0.5
    assert np.isfinite(features.frechet_distance(f1, f2)) and features.frechet_distance(f1, f2) > 0


# ------------------------------------------------------------------------------------------------------- kernel
def _naive_mmd2(x, y):
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def test_kernel_distance_matches_definition():
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((9, 5)), rng.standard_normal((7, 5)) + 0.3
    assert features.kernel_distance(x, y) == pytest.approx(_naive_mmd2(x, y), rel=1e-10)


def test_kernel_distance_unbiased_and_positive_for_different_laws():
    rng = np.random.default_rng(8)
    d = 16
    same = [features.kernel_distance(rng.standard_normal((100, d)), rng.standard_normal((100, d)))
            for _ in range(40)]
    shifted = features.kernel_distance(rng.standard_normal((100, d)), rng.standard_normal((100, d)) + 0.5)
    # unbiased: draws of the same law scatter around 0 (some negative), far below the shifted value
    assert min(same) < 0 < max(same)
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same)) + 1e-12
    assert shifted > 0 and shifted > 10 * np.max(np.abs(same))


# ---------------------------------------------------------------------------------------------------- training
def test_tiny_training_writes_loadable_deterministic_files(tmp_path):
    kw = dict(steps=2, seed=3, threads=1, batch_size=8, eval_count=16)
    r1 = features.train_feature_net(tmp_path / "a", **kw)
    r2 = features.train_feature_net(tmp_path / "b", **kw)
    for folder in ("a", "b"):
        assert (tmp_path / folder / "feature_net.safetensors").is_file()
        assert (tmp_path / folder / "feature_net.json").is_file()
    w1 = load_file(str(tmp_path / "a" / "feature_net.safetensors"))
    w2 = load_file(str(tmp_path / "b" / "feature_net.safetensors"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    # byte-identical files, so a rerun of the committed recipe leaves no diff
    assert (tmp_path / "a" / "feature_net.safetensors").read_bytes() == \
        (tmp_path / "b" / "feature_net.safetensors").read_bytes()
    recipe = json.loads((tmp_path / "a" / "feature_net.json").read_text())
    split = features.read_split()
    assert recipe["steps"] == 2 and recipe["seed"] == 3 and recipe["param_count"] == r1["param_count"]
    assert recipe["classes"] == split["train"] and not set(recipe["classes"]) & set(split["test"])
    assert r1["accuracy"] == r2["accuracy"]
    features.train_feature_net(tmp_path / "c", **{**kw, "seed": 4})
    other = load_file(str(tmp_path / "c" / "feature_net.safetensors"))
    assert not all(torch.equal(w1[k], other[k]) for k in w1)  # the seed matters
    net = features.load_feature_net(tmp_path / "a")
    assert not net.training and net.features(torch.rand(2, 3, 64, 64)).shape == (2, 256)


def test_load_rejects_non_safetensors(tmp_path):
    path = tmp_path / "net.pt"
    torch.save({}, path)
    with pytest.raises(ValueError):
        features.load_feature_net(path)


# --------------------------------------------------------------------------------------------- committed net
@pytest.fixture(scope="module")
def committed_net():
    path = COMMITTED / "feature_net.safetensors"
    assert path.is_file(), "run: .venv/bin/python benchmarks/mini/features.py --out benchmarks/mini/featnet"
    assert path.stat().st_size < 6_000_000
    return features.load_feature_net(path)


def test_committed_net_loads_and_gives_256d_features(committed_net):
    recipe = json.loads((COMMITTED / "feature_net.json").read_text())
    assert recipe["param_count"] == features.param_count(committed_net) < 1_500_000
    assert not set(recipe["classes"]) & set(features.read_split()["test"])
    f = features.extract_features(committed_net, torch.rand(5, 3, 64, 64), batch_size=2)
    assert f.shape == (5, 256) and np.isfinite(f).all()
    sanity = json.loads((COMMITTED / "sanity.json").read_text())
    assert sanity["all_ok"]


def test_committed_net_separates_blur_from_sharp(committed_net):
    test = features.read_split()["test"]
    sharp, other = features.crops01(test, 128, 11), features.crops01(test, 128, 12)
    base = features.distribution_metrics(committed_net, sharp, other)
    blurred = features.distribution_metrics(committed_net, sharp, features.bicubic_blur(sharp, 4))
    noisy = features.distribution_metrics(committed_net, sharp,
                                          features.add_noise(sharp, 0.1, torch.Generator().manual_seed(0)))
    assert set(base) == {"fd_patch", "kd_patch"}
    for metric in ("fd_patch", "kd_patch"):
        assert blurred[metric] > 3 * abs(base[metric]), (metric, base, blurred)
        assert noisy[metric] > 3 * abs(base[metric]), (metric, base, noisy)
