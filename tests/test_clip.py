"""The contrastive text-image family: InfoNCE against numpy, learning a toy set, sharded equals
one device, exact resume, the retrieval report against a brute-force search, bad prompts."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy.special import logsumexp

from experiments.configs import clip_mnist
from models import clip as clip_lib
from tests.conftest import needs_data
from tests.test_sharding import assert_resumed_exactly
from train import captions
from train import loop
from train import run_loader
from train.errors import UserError
from train.families import clip as clip_family


def numpy_info_nce(a, b, scale):
  """CLIP's symmetric loss written out: mean over rows of -log softmax of the diagonal, both
  directions."""
  logits = scale * a @ b.T
  i2t = logsumexp(logits, axis=1) - np.diag(logits)
  t2i = logsumexp(logits, axis=0) - np.diag(logits)
  return (i2t.mean() + t2i.mean()) / 2


def test_info_nce_is_log_batch_for_identical_embeddings_and_matches_numpy():
  rng = np.random.default_rng(0)
  same = np.tile(rng.normal(size=(1, 8)), (6, 1))
  same /= np.linalg.norm(same, axis=1, keepdims=True)
  loss, metrics = clip_lib.symmetric_info_nce(jnp.asarray(same), jnp.asarray(same), 14.3)
  assert float(loss) == pytest.approx(np.log(6), rel=1e-5)
  a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in rng.normal(size=(2, 5, 8)))
  loss, metrics = clip_lib.symmetric_info_nce(jnp.asarray(a, jnp.float32),
                                              jnp.asarray(b, jnp.float32), 3.0)
  assert float(loss) == pytest.approx(numpy_info_nce(a, b, 3.0), rel=1e-5)
  s = a @ b.T
  assert float(metrics['image_to_text_accuracy']) == pytest.approx(
      np.mean(s.argmax(1) == np.arange(5)))
  assert float(metrics['text_to_image_accuracy']) == pytest.approx(
      np.mean(s.argmax(0) == np.arange(5)))


def tiny_model(seed=0):
  return clip_lib.CLIP(image_shape=(28, 28, 1), vocab_size=captions.CaptionTokenizer().vocab_size,
                       max_len=12, proj_dim=16, channels=(4, 8), hidden=16, num_layers=1,
                       num_heads=2, embed_dim=16, rngs=nnx.Rngs(seed))


def test_loss_decreases_on_a_learnable_toy_set():
  # Eight pairs: a bar of one of 4 widths and 2 slants, captioned with its width and slant.
  widths, shears = (1, 3, 5, 7), (-0.6, 0.6)
  images = np.zeros((8, 28, 28, 1), np.float32) - 1
  texts = []
  for i, (w, s) in enumerate((w, s) for w in widths for s in shears):
    for row in range(6, 22):
      left = int(round(14 - w / 2 + s * (13.5 - row)))
      images[i, row, left:left + w] = 1
    texts.append(f'a {("one", "three", "five", "seven")[widths.index(w)]} that is '
                 f'{"left-slanted" if s < 0 else "right-slanted"}')
  tokens = jnp.asarray(captions.CaptionTokenizer().encode(texts, 12))
  model = tiny_model()
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    def loss_fn(model):
      return clip_lib.symmetric_info_nce(model.embed_images(jnp.asarray(images)),
                                         model.embed_texts(tokens), model.scale())[0]
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  assert float(model.scale()) == pytest.approx(1 / 0.07, rel=1e-5)
  losses = [float(step(model, opt)) for _ in range(60)]
  assert losses[0] > 0.7 * np.log(8) and losses[-1] < 0.1 * losses[0], losses[::10]
  model.log_scale[...] = jnp.asarray(10.0)  # the scale is clipped at 100, as CLIP's
  assert float(model.scale()) == pytest.approx(100.0, rel=1e-5)


# ------------------------------------------------------------------------- the tiny MNIST run


def _tiny(total_steps, **overrides):
  """The tiny config with SGD: Adam would blow rounding noise in exactly-zero gradients (the
  attention's key biases) up to lr-sized steps, hiding what the comparisons check."""
  c = clip_mnist.get_config('tiny')
  c.update_from_flattened_dict({
      'total_steps': total_steps, 'log_every': 1, 'optimizer.name': 'sgd',
      'optimizer.momentum': 0.9, 'optimizer.schedule': 'constant', 'optimizer.lr': 0.2,
      'optimizer.warmup_steps': 0, 'optimizer.grad_clip': 0.0, **overrides})
  return c


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(4 steps on 8 devices, on 1 device, the 8-device run cut back to step 2 and resumed)."""
  root = tmp_path_factory.mktemp('clip')
  full = loop.train(_tiny(4), str(root / 'full'))
  one = loop.train(_tiny(4, checkpoint_every=0), str(root / 'one'), devices=jax.devices()[:1])
  workdir = str(root / 'resumed')
  shutil.copytree(root / 'full', workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))   # as if stopped after step 2
  resumed = loop.train(_tiny(4), workdir)
  return full, one, workdir, resumed


@needs_data
def test_sharded_equals_one_device_and_resume_is_exact(runs):
  full, one, _, resumed = runs
  steps = sorted(full.step_losses)
  np.testing.assert_allclose([one.step_losses[s] for s in steps],
                             [full.step_losses[s] for s in steps], rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               jax.device_get(one.state['params']), jax.device_get(full.state['params']))
  assert_resumed_exactly(resumed, full)


@needs_data
def test_retrieval_report_matches_brute_force_and_prompts(runs, tmp_path):
  _, _, workdir, _ = runs
  family, models, step = run_loader.load_models(workdir)
  report_path = str(tmp_path / 'report.json')
  summary = family.evaluate(models, workdir, step, {'batch': 2000, 'report': report_path})
  assert 'text_to_image/unseen' in summary and os.path.isfile(report_path)
  report = __import__('json').load(open(report_path))
  test = family.captioned('test')
  # Brute force with numpy on the model's embeddings: a hit has the label and attributes.
  image_emb = clip_family.embed_images(models, test['image'])
  text_emb = clip_family.embed_texts(models, test['tokens'])
  key = np.stack([test['label'], test['thickness'], test['slant']], 1)
  unseen = test['heldout']
  assert report['unseen_pairs'] == unseen.sum() > 0
  rows = np.flatnonzero(unseen)  # the seen rows go through the same code
  top = np.argsort(-(text_emb[rows] @ image_emb.T), axis=1, kind='stable')[:, :5]
  hit = (key[top] == key[rows, None]).all(-1)
  # (abs: near-ties may fall the other way in another summation order)
  t2i = report['text_to_image/unseen']
  assert t2i['recall@5'] == pytest.approx(hit.any(1).mean(), abs=3e-3)
  assert t2i['recall@1'] == pytest.approx(hit[:, 0].mean(), abs=3e-3)
  top = np.argmax(image_emb[rows] @ text_emb.T, axis=1)
  hit = (key[top] == key[rows]).all(-1)
  assert report['image_to_text/unseen']['recall@1'] == pytest.approx(hit.mean(), abs=3e-3)
  # clip_score is the cosine of each pair, whatever the batch and pixel format.
  images = test['image'][:7]
  scores = clip_family.clip_score(models, images.astype(np.float32) / 127.5 - 1,
                                  test['tokens'][:7], batch=3)
  np.testing.assert_allclose(scores, (image_emb[:7] * text_emb[:7]).sum(1), rtol=1e-5,
                             atol=1e-6)
  out = str(tmp_path / 'retrieved.png')
  line = family.sample(models, None, workdir, {'prompt': 'A thick seven, zebra',
                                               'num_samples': 4, 'out': out})
  assert os.path.isfile(out) and 'zebra' in line
  for bad, why in [('', 'empty'), ('zebra', 'no word')]:
    with pytest.raises(UserError, match=why) as e:
      family.sample(models, None, workdir, {'prompt': bad, 'num_samples': 4, 'out': out})
    assert '\n' not in str(e.value) and repr(bad) in str(e.value)


def test_bad_configs_are_one_line():
  with pytest.raises(UserError, match='longest caption has 12 tokens'):
    clip_family.CLIPFamily(_tiny(2, **{'model.max_len': 8}))
  with pytest.raises(UserError, match="config.data.name='cifar10'"):
    clip_family.CLIPFamily(_tiny(2, **{'data.name': 'cifar10'}))


@pytest.mark.parametrize('which', ['clip', 'text2image', 'classifier', 'ddpm'])
def test_config_dropout_bits_reach_every_dropout_of_the_image_families(which):
  """config.model.dropout_bits is carried by every module that drops something in the model the
  family builds (CLIP's CNN and text encoder; the caption encoder and the UNet), and adds no
  param."""
  from experiments.configs import (  # pylint: disable=import-outside-toplevel
      classifier_mnist, ddpm_mnist, text2image_mnist)
  from train.families import (  # pylint: disable=import-outside-toplevel
      classifier, diffusion, text2image)
  module, family_class = {
      'clip': (clip_mnist, clip_family.CLIPFamily),
      'text2image': (text2image_mnist, text2image.TextToImageFamily),
      'classifier': (classifier_mnist, classifier.ClassifierFamily),
      'ddpm': (ddpm_mnist, diffusion.DiffusionFamily)}[which]

  def build(bits):
    config = module.get_config(None if which == 'ddpm' else 'tiny')
    config.model.update(dropout=0.1, dropout_bits=bits)
    if which == 'text2image':
      config.text.dropout = 0.1
    family = family_class(config)
    family.image_shape = (28, 28, 1)   # what setup_data would read from MNIST
    family.class_names = [str(i) for i in range(10)]
    return family.make_models(nnx.Rngs(0))['model']

  model = build(8)
  rates = [(path, node) for path, node in nnx.iter_graph(model)
           if isinstance(getattr(node, 'dropout', None), float) and node.dropout > 0]
  assert rates, 'no module with a dropout rate'
  assert {getattr(node, 'dropout_bits', None) for _, node in rates} == {8}, [
      ('/'.join(map(str, p)), getattr(n, 'dropout_bits', None)) for p, n in rates]
  shapes = lambda m: jax.tree.map(jnp.shape, nnx.state(m, nnx.Param).to_pure_dict())
  assert shapes(model) == shapes(build(32))
