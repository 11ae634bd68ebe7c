"""experiments/compare_compression.py end to end on :tiny runs of a few steps.

The expected bytes are counted by hand from the GPT's layer shapes (not from the code that
measures them): 4 bytes per f32 param; int8 kernels at 1 byte plus one f32 scale per output
channel; 2:4 kernels as half their weights in f32 plus a 2-bit index per kept weight.
"""

import os

import jax
import pytest

from experiments import compare_compression
from experiments.configs import distill_gpt

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


@needs_tfds
def test_compare_compression_on_tiny_runs(tmp_path):
  out = str(tmp_path)
  # A row whose runs are missing is left out, with the commands to train them.
  report = compare_compression.compare(out, ['distilled'], tiny=True)
  assert report['rows'] == [] and set(report['missing']) == {'teacher', 'distilled'}
  assert '--config.distill.teacher=' in report['missing']['distilled']

  report = compare_compression.compare(
      out, ['scratch', 'ptq_int8_weights', 'pruned_2_4'], tiny=True, train_missing=True,
      student_steps=2, finetune_steps=2, decode_batch=1, decode_tokens=4,
      devices=jax.devices()[:1])
  by = {r['row']: r for r in report['rows']}
  assert list(by) == ['scratch', 'ptq_int8_weights', 'pruned_2_4'] and not report['missing']
  params, kernels, channels = _gpt_counts(distill_gpt.get_config('tiny').model)
  assert by['scratch']['params'] == by['pruned_2_4']['params'] == params
  assert by['scratch']['bytes'] == by['pruned_2_4']['bytes'] == 4 * params  # dense f32
  assert by['ptq_int8_weights']['bytes'] == kernels + 4 * channels + 4 * (params - kernels)
  kept = kernels // 2
  assert by['pruned_2_4']['sparsity'] == 0.5 and by['scratch']['sparsity'] < 0.01
  assert by['pruned_2_4']['sparse_bytes'] == 4 * (params - kernels) + 4 * kept + 2 * kept // 8
  assert abs(by['ptq_int8_weights']['val_loss_change']) < 0.02
  assert all(r['decode_tokens_per_s'] > 0 for r in by.values())
  assert by['scratch']['decode_ratio'] == 1.0
  with open(os.path.join(out, 'compression.md'), encoding='utf-8') as f:
    table = f.read()
  assert table.count('\n| ') == 3 and 'int8 weight-only PTQ within 0.02' in table
  assert os.path.getsize(os.path.join(out, 'compression.png')) > 0
