"""`python -m train.evaluate --workdir=DIR [flags]`: a run's own metrics, per family.

Every family scores itself through `Family.evaluate` with the flags it lists in
`evaluate_flags` (another flag is an error naming it). Translation (train/families/translate.py):
`--split=test2016 --beam_size=4 --length_penalty=0.6 --batch=64 --num_samples=N`, sacreBLEU
BLEU and chrF. Text-to-image (train/text2image_eval.py): `--prompts=test [--classifier=RUN]
[--clip=RUN]`: attribute and label accuracy, Frechet distance and CLIP score of images drawn for
seen and unseen caption combinations.
Image families: what follows.

`python -m train.evaluate --workdir=DIR --classifier=workdirs/classifier_mnist [flags]`: image model scores.

Image model scores. Generates --num_samples images (default 10,000) from DIR's latest
checkpoint (EMA weights where kept) in batches of --batch, with the family's own sampling flags
(as `train.sample`: --labels, for diffusion --sampler --steps --eta --guidance --group_norm_sums,
for the GAN --truncation --best_of; a conditional model gets balanced labels over all classes
unless --labels is given). A feature extractor (--features) maps generated and real test images
to features and class probabilities, and the report gives:

  frechet_distance   between Gaussian fits of generated and real test features (FID's formula)
  precision, recall  improved precision/recall (Kynkaanniemi et al. 2019, k = --pr_k)
  coverage           share classified with confidence > --confidence, per-class histogram,
                     classes covered, evenness; for conditional models label_accuracy
  reference          the same metrics for --num_samples real TRAIN images against the test
                     split: the floor a perfect generator would reach with this extractor
  sampling           images/s (after the first, compiling, batch)
  likelihood         the family's `likelihood_metrics` on --likelihood_examples test images
plus the checkpoint step, parameter counts and the sampling options. It is written as JSON to
--report (default DIR/eval/<features>_n<N>[_options]_step<S>.json) with a PNG grid of the first
100 samples beside it (or at --out), and summarised on stdout.

Progress: every long loop (sampling, featurising the test split, real train images and the
samples, the family's likelihood metrics) prints a line per batch, at most one every 10 s (the
first, which includes compilation, and the last always), with images/s, elapsed time and an
ETA. A diffusion model samples --batch images per line: a smaller --batch gives more lines
(other, equally distributed, samples).

Feature extractors (--features): `classifier` (default) is a `classifier`-family workdir
trained on the model's dataset (experiments/configs/classifier_mnist.py); its Frechet distance
is NOT comparable with published FIDs, which use Inception-v3 features. `inception` with
--inception_weights=FILE.npz (pytorch-fid's weights, see models/inception.py) computes the
standard FID (2048 pool3 features of images resized to 299 x 299); it gives no class
probabilities, so no coverage. Every extractor featurises the whole test split.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from models import inception as inception_lib
from models import rngs as rngs_lib
from train import cli
from train import data as data_lib
from train import image_metrics
from train import images as images_lib
from train import metrics as metrics_lib
from train import run_loader
from train import sample
from train import storage
from train.errors import UserError

_CLASSIFIER = flags.DEFINE_string(
    'classifier', None, 'Workdir of a `classifier`-family run on the same dataset (the feature '
    'extractor of --features=classifier).')
_FEATURES = flags.DEFINE_enum(
    'features', 'classifier', ['classifier', 'inception'], 'Feature extractor: the project\'s '
    'classifier (--classifier), or FID\'s Inception-v3 (--inception_weights).')
_INCEPTION_WEIGHTS = flags.DEFINE_string(
    'inception_weights', None, '--features=inception: pytorch-fid\'s pt_inception-2015-12-05 '
    'state_dict saved as .npz (see models/inception.py).')
_BATCH = flags.DEFINE_integer('batch', 500, 'Images generated (and featurised) per batch.')
_REPORT = flags.DEFINE_string('report', None, 'JSON report path (default DIR/eval/NAME.json).')
_LIKELIHOOD_EXAMPLES = flags.DEFINE_integer(
    'likelihood_examples', 1000, 'Test images for the family\'s likelihood metrics (0: skip).')
_PR_K = flags.DEFINE_integer('pr_k', 3, 'k of the k-NN balls of precision/recall.')
_CONFIDENCE = flags.DEFINE_float('confidence', 0.9, 'Confidence threshold of class coverage.')
flags.DEFINE_string('split', None, 'Translation: the Multi30k split to translate (train, val, '
                    'test2016 (default), test2017, test2018, test2017_mscoco); retriever and '
                    'RAG generator: the knowledge task split whose questions are asked (val '
                    '(default), test).')

flags.DEFINE_string('prompts', None, 'Text-to-image: the split whose captions are drawn and '
                    'scored (test (default), train); see train/text2image_eval.py.')
flags.DEFINE_string('clip', None, 'Text-to-image: workdir of a `clip`-family run whose caption-'
                    'image score is reported.')

# Flags of the families' own evaluations (`Family.evaluate_flags`), besides their sampling flags.
IMAGE_EVALUATE_FLAGS = ('classifier', 'features', 'inception_weights', 'batch', 'report',
                        'likelihood_examples', 'pr_k', 'confidence')
EVALUATE_FLAGS = IMAGE_EVALUATE_FLAGS + ('split', 'prompts', 'clip')

DEFAULT_NUM_SAMPLES = 10_000


def in_batches(apply, images: np.ndarray, batch: int, what: str) -> tuple[np.ndarray, ...]:
  """`apply` (uint8 [batch, H, W, C] -> tuple of [batch, ...] arrays) over uint8 `images` [N, H, W,
  C], `batch` rows at a time, with a progress line named `what`; the outputs concatenated."""
  progress = metrics_lib.Progress(what, len(images))
  outs = []
  for lo in range(0, len(images), batch):
    chunk = images[lo:lo + batch]
    pad = batch - len(chunk)  # a fixed batch shape: one compilation
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    outs.append([np.asarray(x)[:batch - pad] for x in jax.device_get(apply(jnp.asarray(chunk)))])
    progress.update(batch - pad)
  return tuple(np.concatenate(parts) for parts in zip(*outs))


class ClassifierFeatures:
  """Penultimate features and class probabilities of a `classifier`-family workdir."""

  name = 'classifier'

  def __init__(self, workdir: str | None):
    if not workdir:
      raise UserError('--classifier is required: the workdir of a classifier run, e.g. '
                      '`python -m train --config=experiments/configs/classifier_mnist.py '
                      '--workdir=workdirs/classifier_mnist`')
    family, models, step = run_loader.load_run_of('classifier', workdir, '--classifier')
    self.workdir, self.step = workdir, step
    self.dataset = family.config.data.name
    self.image_shape = tuple(family.image_shape)
    self.class_names = list(family.class_names)
    graphdef, state = nnx.split(models['model'])

    @jax.jit
    def apply(state, images):
      model = nnx.merge(graphdef, state)
      feats = model.features(images_lib.to_float(images))
      return feats, jax.nn.softmax(model.logits_from_features(feats), -1)

    self._apply = lambda images: apply(state, images)

  def check(self, image_shape: tuple[int, ...], dataset: str, culprit: str) -> None:
    """UserError unless the extractor fits images of `image_shape` from `dataset`."""
    if tuple(image_shape) != self.image_shape:
      raise UserError(f'--classifier={self.workdir}: takes {list(self.image_shape)} images, '
                      f'but {culprit} has {list(image_shape)}')
    if dataset != self.dataset:
      raise UserError(f'--classifier={self.workdir}: trained on {self.dataset!r}, but {culprit} '
                      f'models {dataset!r}; train a classifier on {dataset!r}')

  def __call__(self, images: np.ndarray, batch: int, what: str = 'features'
               ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, H, W, C] -> (float32 [N, D] features, float32 [N, K] class probabilities)."""
    return in_batches(self._apply, images, batch, what)

  def describe(self) -> dict[str, Any]:
    return {'name': self.name, 'workdir': storage.absolute(self.workdir), 'step': self.step,
            'dataset': self.dataset}


class InceptionFeatures:
  """FID's Inception-v3 pool3 features (2048) of any image size; no class probabilities."""

  name = 'inception'
  class_names = None

  def __init__(self, weights: str | None):
    if not weights:
      raise UserError('--features=inception needs --inception_weights=PATH.npz '
                      '(see models/inception.py for how to make it)')
    if not os.path.isfile(weights):
      raise UserError(f'--inception_weights={weights}: no such file')
    self.weights = weights
    # Built abstractly: every array comes from the file (an eager init takes a minute on CPU).
    model = nnx.eval_shape(lambda: inception_lib.InceptionV3(rngs=rngs_lib.rngs(0)))
    try:
      graphdef, state = nnx.split(inception_lib.load_torch_npz(model, weights))
    except ValueError as e:
      raise UserError(str(e)) from None
    apply = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images_lib.to_float(images)))
    self._apply = lambda images: apply(state, images)

  def check(self, image_shape, dataset, culprit) -> None:
    del image_shape, dataset, culprit  # any image is resized to 299 x 299 RGB

  def __call__(self, images: np.ndarray, batch: int, what: str = 'features'
               ) -> tuple[np.ndarray, None]:
    """uint8 [N, H, W, C] -> (float32 [N, 2048] features, None)."""
    batch = min(batch, 100)  # 299 x 299 activations: ~5 MB per image
    feats, = in_batches(lambda x: (self._apply(x),), images, batch, what)
    return feats, None

  def describe(self) -> dict[str, Any]:
    return {'name': self.name, 'weights': os.path.abspath(self.weights)}


def score(extractor, images: np.ndarray, real: dict[str, np.ndarray], *, batch: int,
          labels: np.ndarray | None = None, k: int = 3, threshold: float = 0.9,
          what: str = 'features of the generated images') -> tuple[dict[str, Any], np.ndarray]:
  """Frechet distance, precision/recall and class coverage of uint8 `images` against `real`;
  returns (those metrics, [N, K] class probabilities of `images`).

  Args:
    extractor: maps (uint8 images, batch, what) to (features, probabilities); `what` names
      the images in its progress line.
    images: uint8 [N, H, W, C] images to score.
    real: {'feats': [M, D] real test features, 'mu': [D], 'sigma': [D, D] their statistics}.
    labels: [N] requested classes (conditional models), or None.
    what: names `images` in the progress line.
  """
  feats, probs = extractor(images, batch, what)
  fd = image_metrics.frechet_distance(*image_metrics.feature_statistics(feats),
                                      real['mu'], real['sigma'])
  # Equal-sized sets: the k-NN radii of precision/recall depend on the set sizes.
  n = min(len(feats), len(real['feats']))
  pr = image_metrics.precision_recall(real['feats'][:n], feats[:n], k=k)
  out = {'frechet_distance': fd, **pr}
  if probs is not None:  # class coverage needs class probabilities (not Inception's)
    out['coverage'] = image_metrics.class_coverage(probs, labels, threshold)
  return out, probs


def num_params(models) -> dict[str, int]:
  return {name: int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(m, nnx.Param))))
          for name, m in models.items()}


def evaluate(workdir: str, extractor, *, num_samples: int = DEFAULT_NUM_SAMPLES,
             batch: int = 500, seed: int = 0, labels: str | None = None,
             options: dict[str, Any] | None = None, likelihood_examples: int = 1000,
             k: int = 3, threshold: float = 0.9, loaded=None
             ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
  """Scores the image model in `workdir`.

  Args:
    workdir: a `python -m train` run of an image family.
    extractor: e.g. `ClassifierFeatures`.
    labels: --labels' text (None: balanced over all classes for a conditional model).
    options: the family's sampling flags (None values: the family's defaults).
    loaded: `run_loader.load_models(workdir)` when the caller already has it.

  Returns:
    (JSON-ready report, uint8 [N, H, W, C] generated images, [N, K] their class probabilities).
  """
  if num_samples < 2 or batch < 1 or likelihood_examples < 0 or k < 1:
    raise UserError(f'--num_samples={num_samples} (>= 2), --batch={batch} (>= 1), '
                    f'--likelihood_examples={likelihood_examples} (>= 0), --pr_k={k} (>= 1): '
                    'one is out of range')
  if num_samples <= k:
    raise UserError(f'--num_samples={num_samples}: precision/recall need more samples than '
                    f'--pr_k={k} (each sample\'s k nearest neighbours)')
  if not 0.0 <= threshold < 1.0:
    raise UserError(f'--confidence={threshold}: must be in [0, 1)')
  family, models, step = loaded or run_loader.load_models(workdir)
  if not isinstance(family, images_lib.ImageFamily) or family.name == 'classifier':
    raise UserError(f'--workdir={workdir}: family {family.name!r} does not generate images')
  config = family.config
  extractor.check(family.image_shape, config.data.name, f'--workdir={workdir}')
  requested = images_lib.parse_labels(labels, num_samples, family.num_classes)
  if requested is None:
    requested = family.default_labels(num_samples)
  options = family.check_sample_options(
      {key: v for key, v in (options or {}).items() if v is not None})

  # Real data: the test split is the reference; as many train images give the floor.
  ds = data_lib.load_images(config.data.name, config.data.data_dir, config.data.raw_dir)
  test_images, test_labels = ds['test']
  train_images = ds['train'][0]
  real_feats, real_probs = extractor(test_images, batch, 'features of the test split')
  real = {'feats': real_feats}
  real['mu'], real['sigma'] = image_metrics.feature_statistics(real_feats)
  pick = np.random.default_rng(seed).permutation(len(train_images))[:num_samples]
  reference, _ = score(extractor, train_images[pick], real, batch=batch, k=k,
                       threshold=threshold, what='features of real train images')
  if real_probs is not None:
    reference['test_coverage'] = image_metrics.class_coverage(real_probs, test_labels, threshold)

  gen_key, likelihood_key = jax.random.split(jax.random.key(seed))
  generated, times = images_lib.generate_in_batches(family, models, gen_key, num_samples,
                                                    requested, options, batch)
  scores, probs = score(extractor, generated, real, batch=batch, labels=requested, k=k,
                        threshold=threshold)
  steady = times[1:] or times  # the first batch includes compilation
  sampling = {'images_per_s': sum(n for n, _ in steady) / sum(t for _, t in steady),
              'first_batch_s': times[0][1], 'total_s': sum(t for _, t in times)}

  likelihood, likelihood_descriptions = {}, {}
  if likelihood_examples:
    t0 = time.perf_counter()
    likelihood = family.likelihood_metrics(
        models, likelihood_key, test_images[:likelihood_examples],
        test_labels[:likelihood_examples])
    if likelihood:
      likelihood = {**likelihood, 'examples': min(likelihood_examples, len(test_images)),
                    'seconds': time.perf_counter() - t0}
      likelihood_descriptions = family.likelihood_descriptions()

  report = {
      'workdir': storage.absolute(workdir), 'family': family.name, 'checkpoint_step': step,
      'num_params': num_params(models), 'dataset': config.data.name,
      'num_samples': num_samples, 'seed': seed, 'sampling_options': options,
      'labels': None if requested is None else (labels or 'balanced'),
      'features': extractor.describe(), 'pr_k': k, 'confidence_threshold': threshold,
      **scores, 'reference_train_vs_test': reference, 'sampling': sampling,
      'likelihood': likelihood}
  if likelihood_descriptions:
    report['likelihood_descriptions'] = likelihood_descriptions
  return report, generated, probs


def report_name(report: dict[str, Any]) -> str:
  """e.g. 'classifier_n10000_sampler-ddim_steps-50_step20000'."""
  opts = ''.join(f'_{k}-{v}' for k, v in sorted(report['sampling_options'].items()))
  labels = '' if report['labels'] in (None, 'balanced') else f'_labels-{report["labels"]}'
  return (f'{report["features"]["name"]}_n{report["num_samples"]}{opts}{labels}'
          f'_step{report["checkpoint_step"]}').replace('/', '-').replace(',', '-')


def summary(report: dict[str, Any]) -> str:
  ref = report['reference_train_vs_test']
  lines = [
      f'{report["family"]} step {report["checkpoint_step"]}: {report["num_samples"]} samples, '
      f'{report["sampling"]["images_per_s"]:.1f} images/s',
      f'  frechet_distance {report["frechet_distance"]:.3f} (real train vs test: '
      f'{ref["frechet_distance"]:.3f}) [{report["features"]["name"]} features]',
      f'  precision {report["precision"]:.3f} recall {report["recall"]:.3f} (real: '
      f'{ref["precision"]:.3f} / {ref["recall"]:.3f})']
  if 'coverage' in report:
    cov = report['coverage']
    lines.append(
        f'  confident (> {report["confidence_threshold"]}) {cov["confident_share"]:.3f}, '
        f'classes covered {cov["classes_covered"]}/{len(cov["class_histogram"])}, '
        f'evenness {cov["evenness"]:.3f}' + (
            f', label accuracy {cov["label_accuracy"]:.3f}' if 'label_accuracy' in cov else ''))
  likelihood = report['likelihood']
  if likelihood:
    # Each figure with its standard error (key + '_stderr') where the family gives one.
    described = report.get('likelihood_descriptions', {})
    lines.append('  likelihood: ' + ', '.join(
        f'{k} {v:.4g}' + (f' +- {likelihood[k + "_stderr"]:.2g}' if k + '_stderr' in likelihood
                          else '')
        for k, v in likelihood.items() if not k.endswith('_stderr') and k not in described))
    lines.extend(f'  {k} {likelihood[k]:.4g} +- {likelihood.get(k + "_stderr", float("nan")):.2g}'
                 f': {text}' for k, text in described.items() if k in likelihood)
  return '\n'.join(lines)


def family_options(family) -> dict[str, Any]:
  """The family's evaluation flags (None when not given); UserError for a given sampling or
  evaluation flag it does not take."""
  for name in sample.FAMILY_FLAGS + EVALUATE_FLAGS:
    if flags.FLAGS[name].present and name not in family.evaluate_flags:
      raise UserError(f'--{name}: not an evaluation flag of family {family.name!r} (it takes: '
                      f'{", ".join("--" + f for f in family.evaluate_flags) or "none"})')
  return {name: flags.FLAGS[name].value if flags.FLAGS[name].present else None
          for name in family.evaluate_flags}


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  workdir = flags.FLAGS.workdir
  if not workdir:
    raise UserError('--workdir is required')
  if not os.path.isfile(os.path.join(workdir, 'config.json')):
    # Not a run directory: the image flags are checked first (then the workdir), as before
    # families had their own evaluations.
    print(evaluate_images(None, workdir), flush=True)
    return
  family, models, step = run_loader.load_models(workdir)
  options = family_options(family)
  # Each family scores itself: image families with `evaluate_images` below.
  print(family.evaluate(models, workdir, step, options), flush=True)


def evaluate_images(loaded, workdir: str) -> str:
  """`train.evaluate` of an image family (`ImageFamily.evaluate`), with the flags above;
  `loaded` is `run_loader.load_models(workdir)` or None to load it here."""
  if _FEATURES.value == 'inception':
    extractor = InceptionFeatures(_INCEPTION_WEIGHTS.value)
  else:
    extractor = ClassifierFeatures(_CLASSIFIER.value)
  loaded = loaded or run_loader.load_models(workdir)
  options = sample.family_options(loaded[0])
  num = options.pop('num_samples', None)
  labels = options.pop('labels', None)
  grid_path = options.pop('out', None)
  report, images, probs = evaluate(
      workdir, extractor, num_samples=DEFAULT_NUM_SAMPLES if num is None else num,
      batch=_BATCH.value, seed=flags.FLAGS.seed,
      labels=labels, options=options, likelihood_examples=_LIKELIHOOD_EXAMPLES.value,
      k=_PR_K.value, threshold=_CONFIDENCE.value, loaded=loaded)
  path = _REPORT.value or storage.join(workdir, 'eval', report_name(report) + '.json')
  storage.write_text(path, json.dumps(report, indent=1))
  # Captions: the class the extractor sees, '?' when not confident.
  names = extractor.class_names
  captions = None if probs is None else [
      names[int(p.argmax())] if p.max() > report['confidence_threshold'] else '?'
      for p in probs[:100]]
  grid = images_lib.save_grid(grid_path or os.path.splitext(path)[0] + '.png', images[:100],
                              captions)
  return f'{summary(report)}\nwrote {path} and {grid}'


if __name__ == '__main__':
  # `python -m train.evaluate` runs this file as __main__: image families' hook then imports
  # `train.evaluate`, which must find this module, not a second copy defining every flag again.
  sys.modules.setdefault('train.evaluate', sys.modules[__name__])
  cli.run(main)
