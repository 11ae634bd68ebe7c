"""Image metrics: Frechet distance identities, precision/recall on toy sets, class coverage."""

import numpy as np
import pytest
from scipy import linalg

from train import image_metrics as im


def _random_cov(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_of_a_set_with_itself_is_zero_and_grows_with_noise():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(2000, 16)) @ rng.normal(size=(16, 16))
  stats = im.feature_statistics(feats)
  assert abs(im.frechet_distance(*stats, *stats)) < 1e-6
  distances = [im.frechet_distance(*stats, *im.feature_statistics(
      feats + s * rng.normal(size=feats.shape))) for s in (0.1, 0.3, 1.0, 3.0)]
  assert distances[0] > 0
  assert all(a < b for a, b in zip(distances, distances[1:])), distances


def test_frechet_matches_closed_forms():
  rng = np.random.default_rng(1)
  d = 8
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
  # General Gaussians: the trace of (s1 s2)^(1/2) equals that of the symmetric
  # (s1^(1/2) s2 s1^(1/2))^(1/2), computed here from eigenvalues instead of sqrtm.
  r1 = linalg.sqrtm(s1).real
  tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
  expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_cross
  np.testing.assert_allclose(im.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-8)
  # Commuting (diagonal) covariances: sum of (sqrt(a) - sqrt(b))^2 plus the mean term.
  a, b = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
  expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
  np.testing.assert_allclose(im.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), expected,
                             rtol=1e-10)
  # Symmetric in its two arguments.
  np.testing.assert_allclose(im.frechet_distance(mu1, s1, mu2, s2),
                             im.frechet_distance(mu2, s2, mu1, s1), rtol=1e-8)


def test_frechet_handles_singular_covariances():
  # Rank-deficient covariances (e.g. dead ReLU features): finite and ~0 against itself.
  rng = np.random.default_rng(2)
  feats = np.concatenate([rng.normal(size=(500, 4)), np.zeros((500, 4))], 1)
  stats = im.feature_statistics(feats)
  fd = im.frechet_distance(*stats, *stats)
  assert np.isfinite(fd) and abs(fd) < 1e-3
  with pytest.raises(ValueError, match='mismatched shapes'):
    im.frechet_distance(stats[0], stats[1], stats[0][:3], stats[1][:3, :3])


def test_knn_radii_exclude_the_point_itself():
  feats = np.array([[0.0], [1.0], [3.0], [7.0]])
  np.testing.assert_allclose(im.knn_radii(feats, 1), [1, 1, 4, 16])
  np.testing.assert_allclose(im.knn_radii(feats, 2, block=3), [9, 4, 9, 36])


def test_precision_recall_on_toy_distributions():
  rng = np.random.default_rng(3)
  real = rng.normal(size=(1000, 4))
  same = im.precision_recall(real, rng.normal(size=(1000, 4)), k=3, block=300)
  assert same['precision'] > 0.9 and same['recall'] > 0.9, same
  # Fakes collapsed to a small region of the real support: all realistic, little diversity.
  collapsed = im.precision_recall(real, 0.1 * rng.normal(size=(1000, 4)), k=3)
  assert collapsed['precision'] > 0.95 and collapsed['recall'] < 0.2, collapsed
  # Disjoint supports.
  far = im.precision_recall(real, rng.normal(size=(1000, 4)) + 20.0, k=3)
  assert far == {'precision': 0.0, 'recall': 0.0}
  # Half the fakes on the real distribution, half far away: precision ~0.5.
  mixed = np.concatenate([rng.normal(size=(500, 4)), rng.normal(size=(500, 4)) + 20.0])
  half = im.precision_recall(real, mixed, k=3)
  assert 0.4 < half['precision'] < 0.55, half


def test_class_coverage():
  k = 4
  confident = np.eye(k)[[0, 1, 2, 3, 0, 1, 2, 3]] * 0.97 + 0.01
  unsure = np.full((2, k), 1.0 / k)
  probs = np.concatenate([confident, unsure])
  out = im.class_coverage(probs, threshold=0.9)
  assert out['confident_share'] == pytest.approx(0.8)
  assert out['class_histogram'] == [2, 2, 2, 2]
  assert out['classes_covered'] == 4 and out['evenness'] == pytest.approx(1.0)
  requested = np.array([0, 1, 2, 0, 0, 1, 2, 3, 0, 0])
  out = im.class_coverage(probs, requested)
  assert out['label_accuracy'] == pytest.approx(0.7)   # rows 0-2, 4-7 (row 3 is class 3)
  assert out['label_accuracy_any_confidence'] == pytest.approx(0.9)  # + unsure rows (top 0)
  # A collapse onto one class, with one stray sample of another: 1 class covered, evenness low.
  collapse = np.eye(k)[[0] * 99 + [1]] * 0.97 + 0.01
  out = im.class_coverage(collapse)
  assert out['classes_covered'] == 1 and out['evenness'] < 0.1
  assert im.class_coverage(unsure)['evenness'] == 0.0
