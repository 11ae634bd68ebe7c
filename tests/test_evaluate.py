"""Image evaluation end to end: the classifier learns MNIST through the shared loop, and
`train.evaluate` scores a generator that returns real images (near the real-data floor) far
better than one that returns noise; bad input gives one-line errors."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx

from experiments.configs import common
from train import config as config_lib
from train import data as data_lib
from train import evaluate
from train import families
from train import images as images_lib
from train import loop
from train.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not os.environ.get('TFDS_DATA_DIR'),
                                reason='TFDS_DATA_DIR (a prepared data_dir with mnist) is not set')


class ToyImageFamily(images_lib.ImageFamily):
  """A class-conditional stand-in generator: returns random MNIST train images of the requested
  classes (config.toy = 'real') or uniform noise ('noise'); one dummy parameter."""

  name = 'toy_images'

  def make_models(self, rngs):
    return {'model': nnx.Linear(1, 1, rngs=rngs)}

  def loss(self, models, batch, rng, *, train):
    return (models['model'].kernel[...] ** 2).sum(), {}

  def generate_images(self, models, rng, num, labels=None, **options):
    c = self.config
    gen = np.random.default_rng(np.asarray(jax.random.key_data(rng)))
    if c.toy == 'noise':
      return gen.integers(0, 256, (num,) + self.image_shape, dtype=np.uint8)
    images, classes = data_lib.load_images(c.data.name, c.data.data_dir, c.data.raw_dir)['train']
    return np.stack([images[gen.choice(np.flatnonzero(classes == l))] for l in labels])

  def likelihood_metrics(self, models, rng, images, labels, **options):
    return {'toy_examples_seen': float(len(images))}


families.register('toy_images', 'tests.test_evaluate:ToyImageFamily')


def train_toy(workdir, toy):
  c = common.base_config()
  c.family = 'toy_images'
  c.conditional = True
  c.toy = toy
  c.data.name = 'mnist'
  c.update(total_steps=1, batch_size=8, log_every=1, eval_every=0, checkpoint_every=0,
           eval_batches=1, sample_count=4)
  loop.train(c, str(workdir), devices=jax.devices()[:1])
  return str(workdir)


@pytest.fixture(scope='module')
def classifier_dir(tmp_path_factory):
  """The tiny classifier config trained for a few hundred steps (~20 s)."""
  workdir = str(tmp_path_factory.mktemp('classifier'))
  config = config_lib.load(os.path.join(ROOT, 'experiments/configs/classifier_mnist.py:tiny'))
  result = loop.train(config, workdir, devices=jax.devices()[:1])
  return workdir, result


def test_classifier_learns_mnist(classifier_dir):
  _, result = classifier_dir
  evals = [r for r in result.history if 'eval/accuracy' in r]
  assert evals and evals[-1]['eval/accuracy'] >= 0.9, evals


def test_real_images_score_near_the_floor_and_noise_far_from_it(classifier_dir, tmp_path):
  extractor = evaluate.ClassifierFeatures(classifier_dir[0])
  kwargs = dict(num_samples=1000, batch=250, likelihood_examples=50)
  real, images, probs = evaluate.evaluate(train_toy(tmp_path / 'real', 'real'), extractor,
                                          **kwargs)
  noise, _, _ = evaluate.evaluate(train_toy(tmp_path / 'noise', 'noise'), extractor, **kwargs)
  floor = real['reference_train_vs_test']
  assert images.shape == (1000, 28, 28, 1) and probs.shape == (1000, 10)
  assert real['num_params'] == {'model': 2} and real['checkpoint_step'] == 1
  assert real['likelihood']['toy_examples_seen'] == 50
  # Real train images are what the floor measures: the same metrics up to sampling noise.
  assert real['frechet_distance'] < 2 * floor['frechet_distance'] + 0.5, (real, floor)
  assert real['precision'] > 0.6 and real['recall'] > 0.6, real
  assert abs(real['precision'] - floor['precision']) < 0.1
  cov, test_cov = real['coverage'], floor['test_coverage']
  assert cov['classes_covered'] == 10 and cov['evenness'] > 0.95
  assert abs(cov['confident_share'] - test_cov['confident_share']) < 0.1
  assert abs(cov['label_accuracy'] - test_cov['label_accuracy']) < 0.1
  # Noise: far away, off the real manifold, not recognised as its requested digits.
  assert noise['frechet_distance'] > 10 * real['frechet_distance'], (noise, real)
  assert noise['precision'] < 0.05 and noise['recall'] < 0.05, noise
  assert noise['coverage']['label_accuracy'] < 0.2
  # The same seed gives the same report.
  again, _, _ = evaluate.evaluate(tmp_path / 'real', extractor, **kwargs)
  assert again['frechet_distance'] == real['frechet_distance']
  with pytest.raises(UserError, match='does not generate images'):
    evaluate.evaluate(classifier_dir[0], extractor, **kwargs)


def test_classifier_of_another_dataset_is_refused(classifier_dir, tmp_path):
  # The same classifier, relabelled as trained on Fashion-MNIST.
  cls = classifier_dir[0]
  with open(os.path.join(cls, 'config.json'), encoding='utf-8') as f:
    config = json.load(f)
  config['data']['name'] = 'fashion_mnist'
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'config.json').write_text(json.dumps(config))
  for name in ('family.json', 'checkpoints'):
    os.symlink(os.path.join(cls, name), other / name)
  extractor = evaluate.ClassifierFeatures(str(other))
  with pytest.raises(UserError, match="trained on 'fashion_mnist'.*models 'mnist'"):
    evaluate.evaluate(train_toy(tmp_path / 'toy', 'real'), extractor, num_samples=10)


def run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'train.evaluate', *args], cwd=ROOT,
                        env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'},
                        capture_output=True, text=True, timeout=300, check=False)


def one_line_error(proc):
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert 'Traceback' not in proc.stderr, proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1, proc.stderr
  return errors[0]


def test_cli_bad_input(classifier_dir, tmp_path):
  toy = str(tmp_path / 'toy')
  os.makedirs(toy)
  assert '--classifier is required' in one_line_error(run_cli(f'--workdir={toy}'))
  missing = one_line_error(run_cli(f'--workdir={toy}', f'--classifier={tmp_path}/nope'))
  assert 'nope: no such directory' in missing
  not_run = one_line_error(run_cli(f'--workdir={toy}', f'--classifier={toy}'))
  assert f'--classifier={toy}: no config.json' in not_run
  # A classifier run is not a generator.
  cls = classifier_dir[0]
  assert 'does not generate images' in one_line_error(
      run_cli(f'--workdir={cls}', f'--classifier={cls}'))


def test_main_writes_report_and_grid(classifier_dir, tmp_path, capsys):
  toy = train_toy(tmp_path / 'toy', 'real')
  capsys.readouterr()
  try:
    flags.FLAGS(['evaluate', f'--workdir={toy}', f'--classifier={classifier_dir[0]}',
                 '--num_samples=300', '--batch=100', '--labels=3,5', '--likelihood_examples=0'])
    evaluate.main(['evaluate'])
  finally:
    flags.FLAGS.unparse_flags()
  # Progress of each long loop: a header, the first (compiling) batch said as such, the last.
  out = capsys.readouterr().out.splitlines()
  rate = r'[\d,.]+ images/s \| elapsed \S+ \| ETA '
  for what, n in (('sampling', 300), ('features of the test split', 10_000),
                  ('features of real train images', 300),
                  ('features of the generated images', 300)):
    lines = [l for l in out if l.startswith(what + ' ') or l.startswith(what + ':')]
    assert lines[0].startswith(f'{what}: {n:,} images'), out
    assert re.fullmatch(f'{what} 100/{n:,} images \\| {rate}\\S+ \\| first chunk: includes '
                        'compilation, if any', lines[1]), lines
    assert re.fullmatch(f'{what} {n:,}/{n:,} images \\| {rate}0s', lines[-1]), lines
  path = os.path.join(toy, 'eval', 'classifier_n300_labels-3-5_step1.json')
  with open(path, encoding='utf-8') as f:
    report = json.load(f)
  assert report['labels'] == '3,5' and report['likelihood'] == {}
  cov = report['coverage']
  assert cov['classes_covered'] == 2 and sum(cov['class_histogram']) == \
      cov['class_histogram'][3] + cov['class_histogram'][5]
  assert cov['label_accuracy_any_confidence'] > 0.85
  assert os.path.isfile(path[:-5] + '.png')
