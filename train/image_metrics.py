"""Sample-quality metrics on feature vectors: Frechet distance, precision/recall, class coverage.

All take host numpy arrays of features (rows = images) or class probabilities; they do not
care which network produced them (train/evaluate.py: the project's classifier, or Inception).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import linalg


def feature_statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] (float64, unbiased) of [N, D] features."""
  feats = np.asarray(feats, np.float64)
  if feats.ndim != 2 or len(feats) < 2:
    raise ValueError(f'feature_statistics needs [N >= 2, D] features, got {feats.shape}')
  return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, FID):

    d^2 = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

  As pytorch-fid: when the square root of a singular product is not finite (or scipy warns
  that it is singular), eps * I is added to both covariances; an imaginary part from round-off
  is dropped, a large one (> 1e-3 on the diagonal) is an error.
  """
  mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
  sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(
      np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f'frechet_distance: mismatched shapes {mu1.shape} {sigma1.shape} '
                     f'{mu2.shape} {sigma2.shape}')
  diff = mu1 - mu2
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always', linalg.LinAlgWarning)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if caught or not np.isfinite(covmean).all():  # scipy warns on a singular product
      offset = np.eye(len(mu1)) * eps
      covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f'frechet_distance: imaginary component {np.abs(covmean.imag).max():.3g} '
                       'in the matrix square root')
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[len(a), len(b)] squared Euclidean distances (clipped at 0 against round-off)."""
  d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
  return np.maximum(d, 0.0)


def knn_radii(feats: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
  """[N] squared distance from each row of [N, D] `feats` to its k-th nearest other row."""
  feats = np.asarray(feats, np.float32)
  if not 1 <= k < len(feats):
    raise ValueError(f'knn_radii: k={k} must be in [1, {len(feats)})')
  out = np.empty(len(feats), np.float32)
  for lo in range(0, len(feats), block):
    d = _sq_distances(feats[lo:lo + block], feats)
    # Index k of the sorted row: index 0 is the row itself (distance 0).
    out[lo:lo + block] = np.partition(d, k, axis=1)[:, k]
  return out


def precision_recall(real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3,
                     block: int = 1024) -> dict[str, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019, Sec. 2).

  Each set's manifold is the union of balls around its points with radius the distance to the
  point's k-th nearest neighbour within the set. Precision: share of fake samples inside the
  real manifold; recall: share of real samples inside the fake manifold. Distances are computed
  `block` rows at a time, so 10k x 10k sets need ~40 MB at once.

  Args:
    real_feats: [N, D] features of real images.
    fake_feats: [M, D] features of generated images.
    k: neighbourhood size (the paper uses 3).

  Returns:
    {'precision': float, 'recall': float}.
  """
  real = np.asarray(real_feats, np.float32)
  fake = np.asarray(fake_feats, np.float32)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f'precision_recall: features {real.shape} and {fake.shape} must be [N, D]')
  real_r, fake_r = knn_radii(real, k, block), knn_radii(fake, k, block)
  fake_in_real = np.zeros(len(fake), bool)
  real_in_fake = np.zeros(len(real), bool)
  for lo in range(0, len(fake), block):
    d = _sq_distances(fake[lo:lo + block], real)                  # [b, N]
    fake_in_real[lo:lo + block] = (d <= real_r[None, :]).any(1)
    real_in_fake |= (d <= fake_r[lo:lo + block, None]).any(0)
  return {'precision': float(fake_in_real.mean()), 'recall': float(real_in_fake.mean())}


def class_coverage(probs: np.ndarray, requested_labels: np.ndarray | None = None,
                   threshold: float = 0.9, min_share: float = 0.1) -> dict[str, object]:
  """How confidently and evenly a classifier recognises generated images.

  Args:
    probs: [N, K] class probabilities of N images.
    requested_labels: [N] classes a conditional model was asked for, or None.
    threshold: a prediction is confident when its top probability exceeds it.
    min_share: a class counts as covered when it holds at least `min_share / K` of the
      confident predictions (0.1: a tenth of its share under a uniform spread), so a few stray
      samples do not hide a mode collapse.

  Returns:
    confident_share: share of images classified with confidence > threshold;
    class_histogram: [K] counts of confident predictions per class;
    classes_covered: number of classes covered (see min_share);
    evenness: entropy of the histogram / log K (1: uniform; 0: one class or none);
    with requested labels, label_accuracy: share classified as their requested label with
    confidence > threshold, and label_accuracy_any_confidence: share whose top class is it.
  """
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2:
    raise ValueError(f'class_coverage needs [N, K] probabilities, got {probs.shape}')
  n, num_classes = probs.shape
  top = probs.argmax(1)
  confident = probs.max(1) > threshold
  hist = np.bincount(top[confident], minlength=num_classes)
  total = hist.sum()
  if not total:
    evenness = 0.0
  else:
    # Imported here: scipy.stats takes ~0.5 s to import, in every command that imports this.
    from scipy import stats  # pylint: disable=import-outside-toplevel
    evenness = float(stats.entropy(hist) / math.log(num_classes)) if num_classes > 1 else 1.0
  out = {'confident_share': float(confident.mean()) if n else 0.0,
         'class_histogram': hist.tolist(),
         'classes_covered': int((hist >= max(1.0, min_share * total / num_classes)).sum()),
         'evenness': evenness}
  if requested_labels is not None:
    requested = np.asarray(requested_labels)
    if requested.shape != (n,):
      raise ValueError(f'class_coverage: requested_labels {requested.shape} must be [{n}]')
    out['label_accuracy'] = float((confident & (top == requested)).mean())
    out['label_accuracy_any_confidence'] = float((top == requested).mean())
  return out
