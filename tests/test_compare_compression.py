"""experiments/compare_compression.py on a :tiny student run directory (written untrained).

The expected bytes are counted by hand from the GPT's layer shapes (not from the code that
measures them): 4 bytes per f32 param; int8 kernels at 1 byte plus one f32 scale per output
channel; sparse kernels as their kept weights in f32 plus a 2-bit index per kept weight (2:4)
or a 1-bit mask per weight (magnitude).
"""

import os

import jax
import jax.numpy as jnp
import pytest

from experiments import compare_compression
from experiments.configs import distill_gpt
from train import loop
from train import prune
from train import sample

needs_tfds = pytest.mark.skipif(not os.environ.get('TFDS_DATA_DIR'),
                                reason='TFDS_DATA_DIR (a prepared data_dir) is not set')

VOCAB = 65  # Tiny Shakespeare's characters


def _gpt_counts(m) -> tuple[int, int, int]:
  """(all params, Linear kernel weights, Linear output channels) of a GPT of config.model m."""
  d, layers = m.embed_dim, m.num_layers
  kernels = layers * (d * 3 * d + d * d + d * 4 * d + 4 * d * d)  # qkv, proj, fc, proj
  channels = layers * (3 * d + d + 4 * d + d)                      # = their biases
  norms = (2 * layers + 1) * 2 * d                                  # ln1, ln2 per block; ln_f
  return VOCAB * d + m.block_size * d + kernels + channels + norms, kernels, channels


def test_sparse_bytes_count_kept_weights_and_their_index():
  kernel = jax.random.normal(jax.random.key(0), (16, 8))  # [in, out]
  bias = jnp.ones((8,))
  two_four = jnp.where(prune.n_of_m_mask(kernel), kernel, 0.0)
  params = {'bias': bias, 'kernel': two_four}  # (leaves in key order)
  # 64 kept f32 weights and a 2-bit index each; the bias dense.
  assert compare_compression.sparse_bytes(params, [False, True], '2:4') == 4 * 8 + 4 * 64 + 16
  magnitude = jnp.where(jnp.arange(128).reshape(16, 8) < 32, 0.0, kernel)  # 96 kept
  params = {'bias': bias, 'kernel': magnitude}
  # 96 kept f32 weights and a 1-bit mask over all 128.
  assert compare_compression.sparse_bytes(params, [False, True], 'magnitude') == 32 + 4 * 96 + 16


@needs_tfds
def test_compare_compression_on_tiny_runs(tmp_path):
  out = str(tmp_path)
  # A row whose runs are missing is left out, with the commands to train them.
  report = compare_compression.compare(out, ['distilled'], tiny=True)
  assert report['rows'] == [] and set(report['missing']) == {'teacher', 'distilled'}
  assert '--config.distill.teacher=' in report['missing']['distilled']

  # The scratch student's run directory, written untrained (training runs are tested elsewhere;
  # this test is about what the comparison measures), at the step the comparison expects.
  run = compare_compression.runs(out, {}, tiny=True, student_steps=2, teacher_steps=2,
                                 finetune_steps=2)['scratch']
  setup = loop.setup(run.config(), jax.devices()[:1])
  state = dict(setup.builder.init(setup.shardings), step=jnp.asarray(2, jnp.int32))
  sample.write_run(run.workdir, run.config(), setup.family, state, 2, {})
  report = compare_compression.compare(
      out, ['scratch', 'ptq_int8_weights'], tiny=True, student_steps=2,
      decode_tokens=0)  # (decode timing: tests/test_quantize.py)
  by = {r['row']: r for r in report['rows']}
  assert list(by) == ['scratch', 'ptq_int8_weights'] and not report['missing']
  params, kernels, channels = _gpt_counts(distill_gpt.get_config('tiny').model)
  assert by['scratch']['params'] == params and by['scratch']['bytes'] == 4 * params  # f32
  assert by['ptq_int8_weights']['bytes'] == kernels + 4 * channels + 4 * (params - kernels)
  assert by['scratch']['sparsity'] < 0.01
  assert abs(by['ptq_int8_weights']['val_loss_change']) < 0.02
  assert not any('decode_tokens_per_s' in r for r in by.values())
  with open(os.path.join(out, 'compression.md'), encoding='utf-8') as f:
    table = f.read()
  assert table.count('\n| ') == 2 and 'int8 weight-only PTQ within 0.02' in table
  assert os.path.getsize(os.path.join(out, 'compression.png')) > 0
