"""int8 quantization with qwix (models/quantize.py, train/quantize.py, config.quantize).

The references are independent of qwix: numpy's absmax scales and int8 rounding, and the float
model the quantized one came from.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import gpt_shakespeare
from models import gpt
from models import quantize as quantize_lib
from train import loop
from train import quantize
from train import run_loader
from train.errors import UserError

needs_tfds = pytest.mark.skipif(not os.environ.get('TFDS_DATA_DIR'),
                                reason='TFDS_DATA_DIR (a prepared data_dir) is not set')


class _Holder(nnx.Module):
  def __init__(self, layer):
    self.layer = layer


def _linear_with_outliers(in_features=48, out_features=24):
  """A Linear whose output columns have very different ranges (per-channel scales matter)."""
  linear = nnx.Linear(in_features, out_features, rngs=nnx.Rngs(0))
  column_scale = np.geomspace(1e-3, 10.0, out_features).astype(np.float32)
  w = linear.kernel[...] * column_scale
  # Each column's largest magnitude positive: it maps to 127.5 steps, which rounds to the top
  # of the int8 range either way (-127.5 is a tie between -128 and -127 that float rounding of
  # the scale decides).
  peak = jnp.take_along_axis(w, jnp.abs(w).argmax(0)[None], axis=0)
  linear.kernel[...] = w * jnp.sign(peak)
  linear.bias[...] = jnp.linspace(-1.0, 1.0, out_features)
  return linear


def _numpy_int8(x, axis):
  """Symmetric absmax int8 as the int8 range [-128, 127] allows: scale = max|x| / 127.5 over
  `axis`, q = clip(round(x / scale)); returns (q, scale)."""
  scale = np.abs(x).max(axis=axis, keepdims=True) / 127.5
  return np.clip(np.round(x / scale), -128, 127), scale


def test_int8_weights_within_half_a_step_of_numpy_absmax():
  linear = _linear_with_outliers()
  w, b = np.asarray(linear.kernel[...]), np.asarray(linear.bias[...])
  holder = _Holder(linear)
  assert quantize_lib.quantize(holder, mode='int8_weights') == ['layer']
  stored = holder.layer.kernel.array
  q, scale = np.asarray(stored.qvalue[...]), np.asarray(stored.scale[...])
  assert q.dtype == np.int8 and scale.shape == (1, w.shape[1])
  ref_q, ref_scale = _numpy_int8(w, axis=0)  # one scale per output channel
  np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
  np.testing.assert_array_equal(q, ref_q)
  # (the absmax element sits exactly half a step off: float32 rounding of 127 * scale)
  assert np.all(np.abs(w - q * ref_scale) <= ref_scale / 2 * (1 + 1e-4))
  # Weight-only: the input stays float, the layer computes x (q * scale) + b.
  x = np.asarray(jax.random.normal(jax.random.key(1), (5, w.shape[0])))
  np.testing.assert_allclose(np.asarray(holder.layer(jnp.asarray(x))), x @ (q * ref_scale) + b,
                             rtol=1e-5, atol=1e-5)


def test_int8_weights_and_activations_against_numpy():
  linear = _linear_with_outliers()
  w, b = np.asarray(linear.kernel[...]), np.asarray(linear.bias[...])
  holder = _Holder(linear)
  quantize_lib.quantize(holder, mode='int8')
  x = np.asarray(jax.random.normal(jax.random.key(1), (5, w.shape[0]))) * np.arange(1, 6)[:, None]
  x *= np.sign(np.take_along_axis(x, np.abs(x).argmax(1)[:, None], axis=1))  # (see above)
  qx, sx = _numpy_int8(x, axis=1)   # one scale per row (token) of the input
  qw, sw = _numpy_int8(w, axis=0)
  want = (qx @ qw) * sx * sw + b     # the int8 x int8 product, rescaled
  np.testing.assert_allclose(np.asarray(holder.layer(jnp.asarray(x))), want, rtol=1e-5,
                             atol=1e-5)


def test_convolutions_need_int8_activations():
  conv = _Holder(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)))  # (the DDPM UNet's layers)
  with pytest.raises(ValueError, match='use mode int8'):
    quantize_lib.quantize(conv, mode='int8_weights')
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  before = np.asarray(conv.layer(x))
  quantize_lib.quantize(conv, mode='int8')
  assert conv.layer.kernel.array.qvalue[...].dtype == jnp.int8
  after = np.asarray(conv.layer(x))
  assert np.linalg.norm(after - before) / np.linalg.norm(before) < 0.02


@pytest.mark.parametrize('mode, bound', [('int8_weights', 0.03), ('int8', 0.05)])
def test_quantized_gpt_logits_close_to_float_and_cached_decoding_quantized(mode, bound):
  model = gpt.GPT(vocab_size=40, block_size=16, num_layers=2, num_heads=2, embed_dim=32,
                  rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 40)
  forward = nnx.jit(lambda m, t: m(t))
  want = np.asarray(forward(model, tokens))
  quantized = nnx.clone(model)
  layers = quantize_lib.quantize(quantized, mode=mode)
  assert len(layers) == 2 * 4  # qkv, proj, fc, proj per block
  got = np.asarray(forward(quantized, tokens))
  error = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert 1e-4 < error < bound, error  # quantized (not equal), and close
  # The KV-cache path runs the same int8 layers: prefill's logits are the full forward's.
  prefill = nnx.jit(lambda m, t: m.prefill(t, m.init_cache(t.shape[0]))[0])
  np.testing.assert_allclose(np.asarray(prefill(quantized, tokens)), got, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- runs end to end


def _tiny_config(**overrides):
  c = gpt_shakespeare.get_config('tiny')
  c.update_from_flattened_dict({'total_steps': 2, 'log_every': 1, 'eval_every': 0,
                                'checkpoint_every': 0, 'sample_tokens': 4, **overrides})
  return c


def _kernel_bytes(tree) -> tuple[int, int]:
  """(bytes of the Linear kernels as stored, bytes of everything else)."""
  kernel = rest = 0
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    size = x.size * x.dtype.itemsize
    if 'kernel' in jax.tree_util.keystr(path):
      kernel += size
    else:
      rest += size
  return kernel, rest


@needs_tfds
def test_quantized_run_samples_evaluates_and_is_smaller(tmp_path):
  one = jax.devices()[:1]
  base = str(tmp_path / 'base')
  base_kernel = np.asarray(loop.train(_tiny_config(), base, devices=one).state['params'][
      'model']['blocks'][0]['mlp']['fc']['kernel'][...])
  out = str(tmp_path / 'int8')
  report = quantize.quantize_run(base, out, 'int8_weights', decode_batch=1, decode_tokens=4)
  assert report['quantized_layers'] == {'model': 2 * 4}
  assert abs(report['eval_loss_change']) < 0.02 and report['decode_tokens_per_s'] > 0
  with open(os.path.join(out, 'quantize.json'), encoding='utf-8') as f:
    assert json.load(f)['quantized_eval_loss'] == report['quantized_eval_loss']

  _, float_models, _ = run_loader.load_models(base)
  family, models, step = run_loader.load_models(out)
  assert step == 2 and family.config.quantize.mode == 'int8_weights'
  assert family.config.quantize.source == f'{os.path.abspath(base)}:2'
  float_kernels, float_rest = _kernel_bytes(nnx.state(float_models['model'], nnx.Param))
  int8_kernels, int8_rest = _kernel_bytes(nnx.state(models['model'], nnx.Param))
  assert int8_kernels <= 0.3 * float_kernels and int8_rest == float_rest
  assert report['param_bytes'] == float_kernels + float_rest
  assert report['quantized_param_bytes'] == int8_kernels + int8_rest
  assert report['quantized_checkpoint_bytes'] < report['checkpoint_bytes']
  # train.sample and train.evaluate's code paths on the quantized run.
  text = family.sample(models, jax.random.key(0), out,
                       {**{k: None for k in family.sample_flags}, 'max_new_tokens': 16})
  assert len(text) > 16
  family.evaluate(models, out, step, {'report': str(tmp_path / 'eval.json')})
  with open(tmp_path / 'eval.json', encoding='utf-8') as f:
    np.testing.assert_allclose(json.load(f)['loss'], report['quantized_eval_loss'], rtol=1e-5)

  # Bad input, one line each; nothing is overwritten.
  with pytest.raises(UserError, match='already exists'):
    quantize.quantize_run(base, out, 'int8')
  with pytest.raises(UserError, match='unknown quantization mode'):
    quantize.quantize_run(base, str(tmp_path / 'other'), 'int4')
  with pytest.raises(UserError, match='already quantized'):
    quantize.quantize_run(out, str(tmp_path / 'other'), 'int8')
  empty = tmp_path / 'no_checkpoint'
  shutil.copytree(base, empty, ignore=shutil.ignore_patterns('checkpoints'))
  with pytest.raises(UserError, match='no checkpoint'):
    quantize.quantize_run(str(empty), str(tmp_path / 'other'), 'int8')
  assert not os.path.exists(tmp_path / 'other')
  with pytest.raises(UserError, match='does not train'):
    loop.train(_tiny_config(**{'quantize.mode': 'int8'}), str(tmp_path / 'ptq'), devices=one)

  # Quantization-aware training from the base, through the ordinary loop, then converted.
  qat = str(tmp_path / 'qat')
  result = loop.train(_tiny_config(**{'quantize.mode': 'int8', 'quantize.qat': True,
                                      'init_from': base, 'total_steps': 1,
                                      'optimizer.warmup_steps': 0}), qat, devices=one)
  assert np.isfinite(list(result.step_losses.values())).all()
  kernel = result.state['params']['model']['blocks'][0]['mlp']['fc']['kernel'][...]
  assert kernel.dtype == jnp.float32  # QAT keeps float params (fake quantization)
  assert np.abs(np.asarray(kernel) - base_kernel).max() > 0  # straight-through gradients
  converted = quantize.quantize_run(qat, str(tmp_path / 'qat_int8'), 'int8', decode_tokens=0)
  # Fake quantization computes what the int8 model computes: the loss barely moves.
  assert abs(converted['eval_loss_change']) < 1e-3, converted
