"""Sharding strategies from the config on 8 fake CPU devices: data parallel, FSDP, tensor
parallel and their combination against one device; FSDP's compiled memory; restoring an
8-device checkpoint on 4 devices; bad meshes and rules fail before compiling."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from experiments.configs import gpt_shakespeare
from tests import toy_families
from train import checkpoint as ckpt_lib
from train import compile as compile_lib
from train import loop
from train import sharding as sharding_lib
from train.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_tfds = pytest.mark.skipif(not os.environ.get('TFDS_DATA_DIR'),
                                reason='TFDS_DATA_DIR (a prepared data_dir) is not set')


def gpt_config(**overrides):
  """GPT :tiny with 8 heads (so 'tensor' can be 8), 3 steps of SGD + momentum, no evals."""
  c = gpt_shakespeare.get_config('tiny')
  c.update_from_flattened_dict({
      'total_steps': 3, 'log_every': 1, 'eval_every': 0, 'checkpoint_every': 0,
      'model.num_heads': 8, 'model.embed_dim': 64,
      'optimizer.name': 'sgd', 'optimizer.momentum': 0.9, 'optimizer.schedule': 'constant',
      'optimizer.lr': 0.2, 'optimizer.warmup_steps': 0, 'optimizer.grad_clip': 0.0,
      **overrides})
  return c


def mesh_overrides(data, fsdp, tensor):
  return {'mesh.data': data, 'mesh.fsdp': fsdp, 'mesh.tensor': tensor}


def three_steps(config, devices=None, init_state=None):
  """The loop's set-up, shardings and jitted step (no checkpoints, no sampling).

  `init_state` (host arrays) is placed in the mesh's shardings instead of running the jitted
  init again (its compile costs more than the steps). Returns (losses, initial state, state).
  """
  setup = loop.setup(config, devices)
  if init_state is None:
    init_state = jax.device_get(setup.builder.init(setup.shardings))
  state = jax.device_put(init_state, setup.shardings)
  step = loop.jit_train_step(setup.builder, config, setup.mesh, setup.shardings)
  losses = []
  for s in range(3):
    state, metrics = step(state, sharding_lib.put_batch(setup.family.train_batch(s), setup.mesh))
    losses.append(float(metrics['loss']))
  return losses, init_state, state


def assert_resumed_exactly(resumed, uninterrupted, steps=(3, 4)):
  """A run resumed from a checkpoint ran exactly `steps`, with the uninterrupted run's losses
  and final state (params, optimizer state, everything the checkpoint holds) bit for bit."""
  assert sorted(resumed.step_losses) == list(steps)
  for s in steps:
    assert resumed.step_losses[s] == uninterrupted.step_losses[s], s
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state),
               jax.device_get(uninterrupted.state))


@needs_tfds
def test_strategies_equal_single_device():
  ref_losses, init_state, ref_state = three_steps(gpt_config(), jax.devices()[:1])
  assert ref_losses[2] < ref_losses[0] - 0.05  # it learns, or equality would prove nothing
  ref_params = jax.device_get(ref_state['params'])
  for name, mesh in [('data', (8, 1, 1)), ('fsdp', (1, 8, 1)), ('tensor', (1, 1, 8)),
                     ('data+fsdp+tensor', (2, 2, 2))]:
    losses, _, state = three_steps(gpt_config(**mesh_overrides(*mesh)), init_state=init_state)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(state['params']), ref_params)
    qkv = state['params']['model']['blocks'][0]['attn']['qkv']['kernel'][...]
    opt_leaves = jax.tree.leaves(state['opt'])  # the momentum mirrors the params' sharding
    if name == 'tensor':
      # Megatron: the qkv columns (whole heads) are split 8 ways, the MLP hidden layer too.
      assert qkv.sharding.spec == P(None, 'tensor')
      assert qkv.addressable_shards[0].data.shape == (64, 3 * 64 // 8)
      assert any(x.shape == (64, 256) and x.sharding.spec == P(None, 'tensor')
                 for x in opt_leaves)
    if name == 'data+fsdp+tensor':
      assert qkv.sharding.spec == P('fsdp', 'tensor')
      assert qkv.addressable_shards[0].data.shape == (32, 3 * 64 // 2)


@needs_tfds
def test_fsdp_params_and_optimizer_take_one_nth_of_data_parallel():
  # GPT :tiny at width 64 with Adam (the default config's 4 x 128 gives the same ratio:
  # see the closing figures of the scale-out work; this is faster to compile).
  def compiled(**overrides):
    c = gpt_shakespeare.get_config('tiny')
    c.update_from_flattened_dict({'model.embed_dim': 64, **overrides})
    return compile_lib.compile_step(c)[0]

  dp, fsdp = compiled(), compiled(**mesh_overrides(1, -1, 1))
  state = lambda r: r['params_bytes'] + r['opt_bytes']
  assert fsdp['opt_bytes'] > fsdp['params_bytes'] > 0
  assert state(fsdp) <= state(dp) / 8 + 1024
  # XLA's own count of the compiled step's arguments: the state plus a batch shard (the same
  # under both meshes), so the state alone shrinks 8x up to the small replicated leaves.
  batch = dp['argument_bytes'] - state(dp)
  assert 0 <= batch < 4096
  assert fsdp['argument_bytes'] - batch <= (dp['argument_bytes'] - batch) / 8 + 1024
  # FSDP gathers weights where they are used; it never reshards activations (all-to-all).
  assert fsdp['collectives']['all-gather'] > 0 and fsdp['collectives']['all-to-all'] == 0


def test_checkpoint_from_8_devices_restores_on_4_and_continues(tmp_path):
  overrides = {'mesh.data': 1, 'mesh.fsdp': -1, 'optimizer.name': 'adamw',
               'optimizer.lr': 1e-2, 'ema_decay': 0.9, 'hidden': 64}
  full = loop.train(toy_families.regression_config(total_steps=6, **overrides),
                    str(tmp_path / 'full'))
  workdir = str(tmp_path / 'elastic')
  first = loop.train(toy_families.regression_config(total_steps=3, **overrides), workdir)
  # Restored exactly into 4-device shardings (fsdp=4) in place of the 8 it was written with.
  config = toy_families.regression_config(total_steps=6, **overrides)
  four = jax.devices()[:4]
  setup = loop.setup(config, four)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False)
  restored, meta = checkpointer.restore(
      3, ckpt_lib.abstract_with_shardings(setup.builder.abstract, setup.shardings))
  checkpointer.close()
  assert meta['data_step'] == 3
  kernel = restored['params']['model']['l1']['kernel'][...]
  assert len(kernel.sharding.device_set) == 4 and kernel.addressable_shards[0].data.shape == (1, 16)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored),
               jax.device_get(first.state))
  # Training continues on 4 devices from the same data position as the uninterrupted run.
  second = loop.train(config, workdir, devices=four)
  assert sorted(second.step_losses) == [4, 5, 6]
  np.testing.assert_allclose([second.step_losses[s] for s in (4, 5, 6)],
                             [full.step_losses[s] for s in (4, 5, 6)], rtol=1e-5)


def test_replicated_arrays_are_saved_unsliced_in_one_process(tmp_path, monkeypatch, caplog):
  # Orbax's replica-parallel saving would slice each replicated array once per device (one
  # compiled slice each); in one process the checkpoint is written from one replica instead.
  slices = []
  real = jax.lax.slice_in_dim
  monkeypatch.setattr(jax.lax, 'slice_in_dim', lambda *a, **k: slices.append(1) or real(*a, **k))
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, P())
  split = jax.sharding.NamedSharding(mesh, P('data'))
  rng = np.random.default_rng(0)
  state = {'w': jax.device_put(rng.standard_normal((64, 32), np.float32), replicated),
           'b': jax.device_put(rng.standard_normal((16, 4), np.float32), split)}
  monkeypatch.setattr(ckpt_lib, '_replica_parallel', None)   # as in a new process
  with caplog.at_level('WARNING'):
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  assert not [r for r in caplog.records if 'overriding' in r.getMessage()]  # nothing to the user
  checkpointer.save(1, state, {'data_step': 1})
  restored, meta = checkpointer.restore(1, ckpt_lib.abstract_with_shardings(
      jax.eval_shape(lambda: state), {'w': replicated, 'b': split}))
  checkpointer.close()
  assert len(jax.devices()) == 8 and not slices
  assert meta['data_step'] == 1 and restored['w'].sharding == replicated
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))


# ---------------------------------------------------------------------------- rules and errors


def test_rule_then_fsdp_on_a_free_dimension():
  rules = [(re.compile(r'qkv/kernel$'), (None, 'tensor'))]
  shape = {'data': 1, 'fsdp': 4, 'tensor': 2}
  assert sharding_lib.leaf_spec('params/m/qkv/kernel', (64, 192), rules, shape) == P('fsdp',
                                                                                    'tensor')
  assert sharding_lib.leaf_spec('opt/m/0/mu/qkv/kernel', (64, 192), rules, shape) == P(
      'fsdp', 'tensor')
  assert sharding_lib.leaf_spec('params/m/fc/kernel', (64, 256), rules, shape) == P(None, 'fsdp')
  assert sharding_lib.leaf_spec('step', (), rules, shape) == P()
  with pytest.raises(UserError, match='gives 2 axes to .* of shape \\[192\\]'):
    sharding_lib.leaf_spec('params/m/qkv/kernel', (192,), rules, shape)


@pytest.mark.parametrize('overrides, message', [
    (mesh_overrides(3, 2, 1), 'needs 6 devices, but 8 are available'),
    (mesh_overrides(-1, 1, -1), 'at most one axis may be -1'),
    ({'sharding.rules': ((r'qkv/kernel$', (None, 'model')),)},
     "unknown mesh axis 'model' (known: data, fsdp, tensor)"),
    ({'sharding.rules': ((r'qkv/kernel$', 'tensor'),)}, 'write a rule as'),
])
def test_bad_mesh_or_rule_is_a_user_error(overrides, message):
  config = toy_families.regression_config(**overrides)
  with pytest.raises(UserError, match=re.escape(message)):
    compile_lib.compile_step(config)


@needs_tfds
def test_tensor_axis_must_divide_the_heads_one_line(tmp_path):
  """Through the CLI: one line, before compiling (no 'compiled' in the output)."""
  proc = subprocess.run(
      [sys.executable, '-m', 'train', f'--config={ROOT}/experiments/configs/gpt_shakespeare.py:tiny',
       f'--workdir={tmp_path}', '--config.mesh.tensor=4'],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
      env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: config.mesh.tensor=4 does not divide config.model.num_heads=2 (the sharding "
      "rules split it over 'tensor')"), proc.stderr
  assert 'Traceback' not in proc.stderr and 'compiled' not in proc.stdout


def test_tpu_topology_without_libtpu_is_one_clear_error():
  try:
    import libtpu  # pylint: disable=import-outside-toplevel,unused-import
    pytest.skip('libtpu is installed: --topology works here')
  except ImportError:
    pass
  with pytest.raises(UserError, match="--topology=v5e:2x2: this JAX cannot describe TPU "
                                      "topologies .*install 'jax\\[tpu\\]'"):
    compile_lib.topology_devices('v5e:2x2')
