"""Text-to-image diffusion: the cross-attention UNet follows the caption and ignores padding, is
the plain UNet when its text paths are zero, guidance mixes the caption and null-caption
predictions; the family through the shared loop (8 devices vs one, exact resume), sampling from
a prompt, `train.evaluate --prompts`, and their bad inputs."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx

from experiments.configs import ddpm_mnist
from experiments.configs import text2image_mnist
from models import diffusion as D
from models import text2image as t2i_lib
from models import unet as unet_lib
from tests.test_sharding import assert_resumed_exactly, mesh_overrides, three_steps
from train import captions
from train import loop
from train import run_loader
from train import sample as sample_lib
from train import text2image_eval
from train.errors import UserError
from train.families.diffusion import DiffusionFamily

needs_tfds = pytest.mark.skipif(not os.environ.get('TFDS_DATA_DIR'),
                                reason='TFDS_DATA_DIR (a prepared data_dir with mnist) is not set')

UNET = dict(image_shape=(8, 8, 1), channels=8, channel_mult=(1, 2), attention_resolutions=(4,),
            groups=4)
TEXT = dict(vocab_size=20, max_len=12, num_layers=1, num_heads=2, embed_dim=16,
            pad_id=captions.PAD_ID)


def _random(make, seed=0):
  """(graphdef, state) of module `make()` with every param random (fresh ones start at zero in
  places). Params come from numpy: compiling the initializers takes longer."""
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  leaves, tree = jax.tree.flatten(abstract)
  rng = np.random.default_rng(seed)
  return graphdef, tree.unflatten([jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype)
                                   for x in leaves])


def _flat(state):
  return {tuple(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}


def test_unet_with_zero_text_paths_is_the_plain_unet():
  plain_def, plain = _random(lambda: unet_lib.UNet(**UNET, rngs=nnx.Rngs(0)))
  text_def, text = _random(lambda: unet_lib.UNet(**UNET, context_dim=16, context_heads=2,
                                                 rngs=nnx.Rngs(0)), seed=1)
  plain_flat, text_flat = _flat(plain), _flat(text)
  # The text model adds params only in its cross-attention blocks (last in each level's list,
  # so no plain path moves) and the pooled-caption projection.
  extra = set(text_flat) - set(plain_flat)
  assert set(plain_flat) < set(text_flat)
  assert {p for p in extra if not (p[0] in ('context_emb', 'mid_cross') or
                                   (p[0] == 'down' and p[2] == '2') or
                                   (p[0] == 'up' and p[2] == '3'))} == set()
  assert any(p[0] == 'down' for p in extra) and any(p[0] == 'up' for p in extra)
  # Shared params copied, the text paths' outputs at zero: the plain UNet's output, whatever
  # the caption.
  zero = lambda p: p[0] == 'context_emb' or p[-2:] in (('proj', 'kernel'), ('proj', 'bias'))
  for path, var in nnx.to_flat_state(text):
    key = tuple(str(k) for k in path)
    if key in plain_flat:
      var.set_value(plain_flat[key].get_value())
    elif zero(key):
      var.set_value(jnp.zeros_like(var.get_value()))
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  t = jnp.array([0, 40, 99])
  context = jax.random.normal(jax.random.key(1), (3, 5, 16))
  mask = jnp.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
  want = jax.jit(lambda x, t: nnx.merge(plain_def, plain)(x, t))(x, t)
  got = jax.jit(lambda x, t, c, m: nnx.merge(text_def, text)(x, t, context=c, context_mask=m))(
      x, t, context, mask)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='needs context and context_mask'):
    nnx.merge(text_def, text)(x, t)


@pytest.fixture(scope='module')
def text_unet():
  graphdef, state = _random(lambda: t2i_lib.TextToImageUNet(text=TEXT, unet=UNET,
                                                            rngs=nnx.Rngs(0)))
  return jax.jit(lambda x, t, tokens: nnx.merge(graphdef, state)(x, t, tokens))


X = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
T = jnp.array([5, 70])
CAPTIONS = np.array([[3, 4, 5, 6, 0, 0, 0, 0], [7, 8, 9, 0, 0, 0, 0, 0]], np.int32)


def test_output_follows_the_caption_and_not_its_padding(text_unet):
  out = np.asarray(text_unet(X, T, CAPTIONS))
  changed = CAPTIONS.copy()
  changed[:, 1] += 5   # one word of each caption
  diff = np.abs(np.asarray(text_unet(X, T, changed)) - out).reshape(2, -1).max(1)
  assert np.all(diff > 1e-3), diff
  # The same captions padded to 12 tokens: the unpadded output (an independent reference).
  longer = np.pad(CAPTIONS, ((0, 0), (0, 4)), constant_values=captions.PAD_ID)
  np.testing.assert_allclose(text_unet(X, T, longer), out, rtol=1e-5, atol=1e-5)


def test_guidance_0_is_the_null_caption_prediction(text_unet):
  null = captions.null_tokens(1, 8)[0]
  cond = text_unet(X, T, CAPTIONS)
  uncond = text_unet(X, T, np.tile(null, (2, 1)))
  assert float(jnp.abs(cond - uncond).max()) > 1e-3
  tokens = jnp.asarray(CAPTIONS)
  np.testing.assert_array_equal(D.guided(text_unet, tokens, null, 0.0)(X, T), uncond)
  np.testing.assert_array_equal(D.guided(text_unet, tokens, null, 1.0)(X, T), cond)
  # Other scales: one doubled batch (captions + null captions) through the network.
  np.testing.assert_allclose(D.guided(text_unet, tokens, null, 3.0)(X, T),
                             uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-5)


# ---- the family through the shared loop ----
def _tiny(**overrides):
  """:tiny with SGD and no dropout (the sharded comparison needs the same arithmetic)."""
  c = text2image_mnist.get_config('tiny')
  c.update_from_flattened_dict({
      'total_steps': 4, 'checkpoint_every': 2, 'eval_every': 0, 'log_every': 1,
      'model.dropout': 0.0, 'optimizer.name': 'sgd', 'optimizer.momentum': 0.9,
      'optimizer.schedule': 'constant', 'optimizer.lr': 0.05, 'optimizer.warmup_steps': 0,
      'optimizer.grad_clip': 0.0, **overrides})
  return c


@pytest.fixture(scope='module')
def resumed_run(tmp_path_factory):
  """(uninterrupted 4-step result on 8 devices, workdir resumed from step 2 to 4, its result)."""
  if not os.environ.get('TFDS_DATA_DIR'):
    pytest.skip('TFDS_DATA_DIR (a prepared data_dir with mnist) is not set')
  root = tmp_path_factory.mktemp('t2i')
  full = loop.train(_tiny(), str(root / 'full'))
  workdir = str(root / 'resumed')
  shutil.copytree(str(root / 'full'), workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  return full, workdir, loop.train(_tiny(), workdir)


def test_resume_is_exact_and_8_devices_equal_one(resumed_run):
  full, _, second = resumed_run
  assert_resumed_exactly(second, full)
  # One device from the same init: the same first 3 steps as the 8-device data-parallel run.
  losses, _, _ = three_steps(_tiny(**mesh_overrides(1, 1, 1)), jax.devices()[:1])
  np.testing.assert_allclose(losses, [full.step_losses[s] for s in (1, 2, 3)], rtol=2e-5)
  assert losses[2] < losses[0]   # it learns, or equality would prove little


def test_prompt_sampling_evaluation_and_bad_input(resumed_run, tmp_path):
  _, workdir, _ = resumed_run
  family, models, step = run_loader.load_models(workdir)
  assert family.name == 'text2image' and step == 4
  for prompt, fragment in (('', "--prompt: prompt '' is empty"),
                           ('purple elephants', "--prompt: prompt 'purple elephants' has no "
                                                'word the captions use'),
                           ('a seven;', "--prompt: prompt '' is empty")):
    with pytest.raises(UserError, match=fragment):
      family.sample(models, jax.random.key(0), workdir, {'prompt': prompt})
  out = str(tmp_path / 'grid.png')
  text = family.sample(models, jax.random.key(0), workdir, dict(
      prompt='a thick, right-slanted seven;a thin 2', num_samples=2, steps=2, guidance=3.0,
      out=out))
  assert text == f'wrote 2 x 2 samples to {out}' and os.path.isfile(out)
  with pytest.raises(UserError, match="--prompts=validation: split 'validation'"):
    text2image_eval.prompt_split(family, 'validation')
  # train.evaluate --prompts=test: attribute accuracy of seen and unseen captions (sampled
  # with the GroupNorms' dot form, which the run was not trained with).
  report = str(tmp_path / 'report.json')
  summary = family.evaluate(models, workdir, step, dict(
      prompts='test', num_samples=3, steps=2, batch=3, report=report, group_norm_sums='dot'))
  assert 'seen (3 captions): attribute accuracy' in summary
  assert 'unseen (3 captions): attribute accuracy' in summary
  assert os.path.isfile(report) and os.path.isfile(report[:-5] + '.png')
  with open(report, encoding='utf-8') as f:
    assert json.load(f)['sampling_options']['group_norm_sums'] == 'dot'
  assert family.group_norm_sums == 'reduce'


def test_prompt_to_a_class_conditional_run_is_one_line():
  family = DiffusionFamily(ddpm_mnist.get_config('cond,tiny'))
  try:
    flags.FLAGS(['sample', '--prompt=a thick seven'])
    with pytest.raises(UserError, match="--prompt: not a sampling flag of family 'diffusion'"):
      sample_lib.family_options(family)
  finally:
    flags.FLAGS.unparse_flags()
