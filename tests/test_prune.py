"""Pruning (train/prune.py): masks against numpy references, masks held fixed through training
from an init_from run (pruned weights exactly 0, EMA included, under FSDP, across a resume),
the GPT's pruned params, and one-line bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import gpt_shakespeare
from models import gpt
from tests.test_tune import leaves_by_path, toy
from train import loop
from train import prune
from train.errors import UserError


# ------------------------------------------------------------------------------ the masks


def test_magnitude_masks_prune_the_smallest_over_all_kernels():
  rng = np.random.default_rng(0)
  kernels = [rng.normal(size=(8, 12)).astype(np.float32),
             3.0 * rng.normal(size=(12, 4)).astype(np.float32)]  # larger: pruned less
  everything = np.concatenate([np.abs(k).ravel() for k in kernels])
  for sparsity in (0.0, 0.5, 0.75, 0.9, 0.33):
    masks = jax.jit(prune.magnitude_masks, static_argnums=1)(
        [jnp.asarray(k) for k in kernels], sparsity)
    n_pruned = round(sparsity * everything.size)
    # numpy: pruned are exactly the weights at or below the n-th smallest magnitude (the
    # random values are distinct).
    threshold = np.sort(everything)[n_pruned - 1] if n_pruned else -1.0
    for k, m in zip(kernels, masks):
      np.testing.assert_array_equal(np.asarray(m), np.abs(k) > threshold)
    zeros = sum(int((~np.asarray(m)).sum()) for m in masks)
    assert abs(zeros - sparsity * everything.size) <= 1  # within one weight of the request
  assert (~np.asarray(masks[0])).mean() > (~np.asarray(masks[1])).mean()  # global, not per-leaf


def test_2_of_4_keeps_the_two_largest_of_every_group_along_the_input():
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(32, 96)).astype(np.float32)  # [in, out], as nnx.Linear
  mask = np.asarray(prune.n_of_m_mask(jnp.asarray(kernel)))
  for col in range(kernel.shape[1]):
    for start in range(0, kernel.shape[0], 4):
      group = np.abs(kernel[start:start + 4, col])
      expected = np.zeros(4, bool)
      expected[np.argsort(group)[2:]] = True  # the two largest magnitudes
      np.testing.assert_array_equal(mask[start:start + 4, col], expected)


def test_gpt_pruned_params_are_the_block_matmul_kernels():
  abstract = nnx.state(nnx.eval_shape(lambda: gpt.GPT(
      vocab_size=11, block_size=8, num_layers=2, num_heads=2, embed_dim=16,
      rngs=nnx.Rngs(0))), nnx.Param)
  c = gpt_shakespeare.get_config('tiny')
  c.prune.method = 'magnitude'
  selected = prune.Pruning(c).selected('model', abstract)
  paths = [p for (p, _), s in zip(leaves_by_path(abstract).items(), selected) if s]
  assert paths == sorted(f'blocks/{i}/{layer}/kernel/value' for i in range(2)
                         for layer in ('attn/proj', 'attn/qkv', 'mlp/fc', 'mlp/proj'))


# ------------------------------------------------------------------------------ fine-tuning


def test_masks_stay_fixed_through_fine_tuning_and_resume(tmp_path):
  base = loop.train(toy(hidden=64, total_steps=3), str(tmp_path / 'base'))
  base_params = leaves_by_path(base.state['params'])
  kernels = ('model/l1/kernel/value', 'model/l2/kernel/value')
  magnitudes = np.concatenate([np.abs(base_params[k]).ravel() for k in kernels])
  n_pruned = round(0.3 * magnitudes.size)
  threshold = np.sort(magnitudes)[n_pruned - 1]
  # AdamW with weight decay, EMA, FSDP over 8 devices: pruned weights must stay exactly 0.
  tuned = {'init_from': str(tmp_path / 'base'), 'prune.method': 'magnitude',
           'prune.sparsity': 0.3, 'optimizer.name': 'adamw', 'optimizer.weight_decay': 0.1,
           'ema_decay': 0.5, 'mesh.data': 1, 'mesh.fsdp': -1, 'eval_every': 5}
  straight = loop.train(toy(hidden=64, total_steps=5, **tuned), str(tmp_path / 'straight'))
  params, ema = leaves_by_path(straight.state['params']), leaves_by_path(straight.state['ema'])
  for k in kernels:
    pruned = np.abs(base_params[k]) <= threshold  # from the base run's weights (numpy)
    assert pruned.any() and (~pruned).any()
    assert not params[k][pruned].any() and not ema[k][pruned].any(), k
    assert np.all(params[k][~pruned] != base_params[k][~pruned]), k  # the rest trained
  eval_row = [h for h in straight.history if 'eval/sparsity' in h][-1]
  assert eval_row['eval/sparsity'] == n_pruned / magnitudes.size

  # Stopped after 2 steps and resumed: the masks come back with the optimizer state.
  workdir = str(tmp_path / 'resumed')
  loop.train(toy(hidden=64, total_steps=2, **tuned), workdir)
  resumed = loop.train(toy(hidden=64, total_steps=5, **tuned), workdir)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state),
               jax.device_get(straight.state))

  # 2:4 on l2's kernel [64, 1]: 2 of every 4 consecutive input weights, those of the base's
  # largest magnitudes, kept through training.
  two_four = loop.train(toy(hidden=64, total_steps=3, **{
      **tuned, 'prune.method': '2:4', 'prune.params': r'l2/kernel$'}), str(tmp_path / '2_4'))
  kernel = leaves_by_path(two_four.state['params'])['model/l2/kernel/value'][:, 0]
  base_kernel = base_params['model/l2/kernel/value'][:, 0]
  for start in range(0, 64, 4):
    kept = np.sort(np.argsort(np.abs(base_kernel[start:start + 4]))[2:])
    np.testing.assert_array_equal(np.flatnonzero(kernel[start:start + 4]), kept)
  l1_kernel = leaves_by_path(two_four.state['params'])['model/l1/kernel/value']
  assert np.all(l1_kernel != 0)  # not selected: not pruned


@pytest.mark.parametrize('overrides, message', [
    ({'prune.method': 'magnitude', 'prune.sparsity': 1.0},
     r'^config.prune.sparsity=1.0: must be in \[0, 1\)'),
    ({'prune.method': 'magnitude', 'prune.sparsity': -0.1},
     r'^config.prune.sparsity=-0.1: must be in \[0, 1\)'),
    ({'prune.method': 'random'}, r"^config.prune.method='random': unknown \(use one of none, "
                                 r'magnitude, 2:4\)'),
    ({'prune.method': '2:4'}, r"^config.prune.method='2:4': model/l1/kernel has input "
                              r'dimension 1, not a multiple of 4'),
    ({'prune.method': 'magnitude', 'prune.params': 'nothing'},
     r"^config.prune.params='nothing': selects no param of model"),
    ({'prune.method': 'magnitude', 'trainable': 'model/l2/'},
     r"^config.prune.method='magnitude' needs config.trainable='all'"),
])
def test_bad_prune_inputs_are_one_line(tmp_path, overrides, message):
  with pytest.raises(UserError, match=message) as e:
    loop.train(toy(**overrides), str(tmp_path / 'run'))
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'run' / 'checkpoints').exists()
