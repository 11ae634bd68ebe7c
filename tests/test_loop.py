"""The shared loop: sharded runs against single-device and pmap references, exact resume,
gradient accumulation, the two-network family, the non-finite guard, damaged checkpoints, and
the host side of the steps (metrics fetched in bulk, Python's garbage collector kept off them)."""

import gc
import glob
import os
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import gpt_shakespeare
from tests import toy_families
from train import families
from train import loop
from train import sharding as sharding_lib
from train.errors import UserError

needs_tfds = pytest.mark.skipif(not os.environ.get('TFDS_DATA_DIR'),
                                reason='TFDS_DATA_DIR (a prepared data_dir) is not set')


def params_of(result, name='model'):
  return jax.device_get(result.state['params'][name])


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def gpt_sgd_config(**overrides):
  """GPT :tiny on Tiny Shakespeare, 3 SGD steps, logged every step, no evals or checkpoints."""
  c = gpt_shakespeare.get_config('tiny')
  c.update_from_flattened_dict({
      'total_steps': 3, 'log_every': 1, 'eval_every': 0, 'checkpoint_every': 0,
      'optimizer.name': 'sgd', 'optimizer.schedule': 'constant', 'optimizer.lr': 0.5,
      'optimizer.warmup_steps': 0, 'optimizer.grad_clip': 0.0, **overrides})
  return c


def pmap_reference(config, steps):
  """`steps` SGD steps of data parallelism the pmap way: per-device grads, `lax.pmean`."""
  family = families.get(config.family)(config)
  family.setup_data(0, 1)
  builder = loop.StateBuilder(family, config)
  state = jax.device_get(builder.init(jax.tree.map(
      lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), builder.abstract)))
  graphdef, rest = builder.graphdefs['model'], state['rest']['model']
  tx = builder.optimizers['model']
  n = jax.device_count()

  def step(params, opt_state, batch):
    def local_loss(p):
      return family.loss({'model': nnx.merge(graphdef, p, rest)}, batch, jax.random.key(0),
                         train=True)[0]
    loss, grads = jax.value_and_grad(local_loss)(params)
    grads = jax.lax.pmean(grads, 'devices')
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(jnp.add, params, updates)
    return params, opt_state, jax.lax.pmean(loss, 'devices')

  p_step = jax.pmap(step, axis_name='devices')
  stack = lambda t: jax.tree.map(lambda x: np.stack([x] * n), t)
  params, opt_state = stack(state['params']['model']), stack(state['opt']['model'])
  losses = []
  for s in range(steps):
    batch = jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), family.train_batch(s))
    params, opt_state, loss = p_step(params, opt_state, batch)
    losses.append(float(loss[0]))
  return jax.tree.map(lambda x: np.asarray(x[0]), params), losses


@needs_tfds
def test_gpt_data_parallel_equals_single_device_and_pmap(tmp_path):
  assert jax.device_count() == 8
  config = gpt_sgd_config()
  single = loop.train(config, str(tmp_path / 'single'), devices=jax.devices()[:1])
  dp = loop.train(config, str(tmp_path / 'dp'))
  ref_params, ref_losses = pmap_reference(config, 3)
  losses = lambda r: [r.step_losses[s] for s in (1, 2, 3)]
  # The loss must move, or equality would prove nothing.
  assert losses(single)[2] < losses(single)[0] - 0.05
  np.testing.assert_allclose(losses(dp), losses(single), rtol=1e-6)
  np.testing.assert_allclose(losses(dp), ref_losses, rtol=1e-6)
  assert_trees_close(params_of(dp), params_of(single))
  assert_trees_close(params_of(dp), ref_params)


@needs_tfds
def test_gpt_fsdp_equals_data_parallel_and_shards_state(tmp_path):
  # SGD with momentum: an optimizer state that mirrors the params, without Adam's sign-like
  # update that turns float reduction-order noise in near-zero gradients into lr-sized steps.
  config = gpt_sgd_config(**{'optimizer.momentum': 0.9})
  dp = loop.train(config, str(tmp_path / 'dp'))
  fsdp_config = gpt_sgd_config(**{'optimizer.momentum': 0.9, 'mesh.data': 1, 'mesh.fsdp': -1})
  fsdp = loop.train(fsdp_config, str(tmp_path / 'fsdp'))
  np.testing.assert_allclose([fsdp.step_losses[s] for s in (1, 2, 3)],
                             [dp.step_losses[s] for s in (1, 2, 3)], rtol=1e-5)
  assert_trees_close(params_of(fsdp), params_of(dp))
  # Every large matrix of params and Adam moments is split 8 ways under FSDP.
  for tree in (fsdp.state['params'], fsdp.state['opt']):
    for x in jax.tree.leaves(tree):
      if x.ndim == 2 and max(x.shape) % 8 == 0:
        assert x.addressable_shards[0].data.size == x.size // 8, x.shape


def test_resume_equals_uninterrupted(tmp_path):
  # Adam with warmup + cosine decay: exact resume needs the optimizer state and the schedule's
  # step, not just the params.
  overrides = {'optimizer.name': 'adamw', 'optimizer.schedule': 'cosine', 'optimizer.lr': 1e-2,
               'optimizer.warmup_steps': 2, 'optimizer.decay_steps': 8, 'optimizer.grad_clip': 1.0,
               'optimizer.weight_decay': 0.1, 'ema_decay': 0.9}
  full = loop.train(toy_families.regression_config(total_steps=8, **overrides),
                    str(tmp_path / 'full'))
  workdir = str(tmp_path / 'resumed')
  first = loop.train(toy_families.regression_config(total_steps=4, **overrides), workdir)
  assert sorted(first.step_losses) == [1, 2, 3, 4]
  second = loop.train(toy_families.regression_config(total_steps=8, **overrides), workdir)
  assert sorted(second.step_losses) == [5, 6, 7, 8]
  for s in range(1, 9):
    assert (first.step_losses | second.step_losses)[s] == full.step_losses[s], s
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(second.state),
               jax.device_get(full.state))


def test_gradient_accumulation_equals_full_batch(tmp_path):
  one = loop.train(toy_families.regression_config(**{'optimizer.lr': 0.02}),
                   str(tmp_path / 'one'))
  four = loop.train(toy_families.regression_config(grad_accum_steps=2, **{'optimizer.lr': 0.02}),
                    str(tmp_path / 'four'))
  assert_trees_close(params_of(four), params_of(one))
  np.testing.assert_allclose(four.step_losses[6], one.step_losses[6], rtol=1e-5)


def test_two_network_family_trains_in_one_step(tmp_path):
  """A 1-D GAN: discriminator then generator update, two optimizers, one jitted step."""
  result = loop.train(toy_families.gan_config(), str(tmp_path), devices=jax.devices()[:2])
  state = jax.device_get(result.state)
  assert set(state['opt']) == {'generator', 'discriminator'}
  fake_means = [h['fake_mean'] for h in result.history if 'fake_mean' in h]
  # The generator's output starts near 0 and must move to the real mean (4.0).
  assert abs(fake_means[0]) < abs(fake_means[0] - 4.0)
  assert abs(fake_means[-1] - 4.0) < 0.5, fake_means
  # The discriminator was trained too (its params moved from their initial values).
  init = loop.StateBuilder(families.get('toy_gan')(toy_families.gan_config()),
                           toy_families.gan_config()).init(None)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                       state['params']['discriminator'],
                       jax.device_get(init['params']['discriminator']))
  assert max(jax.tree.leaves(moved)) > 1e-2


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = toy_families.regression_config(total_steps=8, nan_step=4, checkpoint_every=2,
                                          log_every=4, **{'optimizer.lr': 0.02})
  with pytest.raises(loop.NonFiniteLossError, match='at step 5'):
    loop.train(config, str(tmp_path))
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(str(tmp_path / 'checkpoints/*')))
  assert steps == [2, 4]
  # The run resumes from step 4 (and meets the same NaN batch again).
  with pytest.raises(loop.NonFiniteLossError, match='at step 5'):
    loop.train(config, str(tmp_path))


def test_bulk_metric_fetches_record_every_step_and_catch_a_nan(tmp_path):
  # log_every 40: the metrics come back at the 16-step syncs, which leave the newest step
  # running, and at the log; logging every step fetches each step alone, the reference.
  bulk = loop.train(toy_families.regression_config(total_steps=40, log_every=40),
                    str(tmp_path / 'bulk'))
  each = loop.train(toy_families.regression_config(total_steps=40, log_every=1),
                    str(tmp_path / 'each'))
  assert sorted(bulk.step_losses) == list(range(1, 41))
  assert bulk.step_losses == each.step_losses
  train_loss = [h['loss'] for h in bulk.history if 'loss' in h]
  np.testing.assert_allclose(train_loss, [np.mean([each.step_losses[s] for s in range(1, 41)])],
                             rtol=1e-6)
  # A NaN between two syncs is still caught, at its own step, with nothing checkpointed.
  with pytest.raises(loop.NonFiniteLossError, match='at step 21;'):
    loop.train(toy_families.regression_config(total_steps=40, log_every=40, nan_step=20),
               str(tmp_path / 'nan'))
  assert not glob.glob(str(tmp_path / 'nan/checkpoints/*'))
  assert gc.isenabled() and gc.get_freeze_count() == 0  # restored after an error too


def test_loop_frees_reference_cycles_and_restores_the_collector(tmp_path, monkeypatch):
  """Automatic collection is off inside the loop: cyclic garbage must still be freed."""
  toy = families.get('toy_regression')
  train_batch = toy.train_batch
  freed, freed_by_step = [], {}

  class Cycle:
    def __init__(self):
      self.me = self

  def train_batch_leaving_a_cycle(self, step):
    weakref.finalize(Cycle(), freed.append, step)  # garbage only a cyclic collection frees
    freed_by_step[step] = len(freed)
    return train_batch(self, step)

  monkeypatch.setattr(toy, 'train_batch', train_batch_leaving_a_cycle)
  gc.collect()
  loop.train(toy_families.regression_config(total_steps=40, log_every=40),
             str(tmp_path), devices=jax.devices()[:1])
  # The 16-step syncs have freed the cycles of the first steps before the run ends.
  assert freed_by_step[39] >= 16, freed_by_step
  assert gc.isenabled() and gc.get_freeze_count() == 0


def test_damaged_checkpoint_is_a_clear_error_and_is_kept(tmp_path):
  config = toy_families.regression_config(total_steps=2, **{'optimizer.lr': 0.02})
  loop.train(config, str(tmp_path))
  files = [p for p in glob.glob(str(tmp_path / 'checkpoints/2/state/**'), recursive=True)
           if os.path.isfile(p) and os.path.getsize(p) > 0]
  assert files
  for p in files:
    with open(p, 'wb') as f:
      f.write(b'garbage')
  config.total_steps = 4
  with pytest.raises(UserError, match='checkpoint .*/2 cannot be restored') as e:
    loop.train(config, str(tmp_path))
  assert '\n' not in str(e.value)
  assert os.path.isdir(tmp_path / 'checkpoints/2')


def test_quiet_restore_leftovers_drops_only_a_failed_restores_leftovers(monkeypatch):
  """The unraisable hook drops 'Event loop is closed' and errors of Orbax's coroutines, and
  hands anything else to the hook it replaced; asyncio's never-retrieved records are
  filtered; two calls install each piece once."""
  import logging  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  from train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', lambda info: seen.append(info.exc_value))
  asyncio_logger = logging.getLogger('asyncio')
  monkeypatch.setattr(asyncio_logger, 'filters', [])
  ckpt_lib.quiet_restore_leftovers()
  ckpt_lib.quiet_restore_leftovers()
  assert len(asyncio_logger.filters) == 1
  namespace = {}
  exec(compile('async def read(): pass', '/site-packages/orbax/checkpoint/x.py', 'exec'),
       namespace)
  async def ours():
    pass
  orbax_coroutine, our_coroutine = namespace['read'](), ours()
  other, ours_failed = RuntimeError('Event loop is running'), ValueError('ours')
  for exc, obj in [(RuntimeError('Event loop is closed'), None), (other, None),
                   (ValueError('orbax'), orbax_coroutine), (ours_failed, our_coroutine)]:
    sys.unraisablehook(types.SimpleNamespace(exc_value=exc, object=obj))
  orbax_coroutine.close()
  our_coroutine.close()
  assert seen == [other, ours_failed]
  record = lambda msg: logging.LogRecord('asyncio', logging.ERROR, __file__, 1, msg, None, None)
  assert not asyncio_logger.filter(record('Task exception was never retrieved'))
  assert asyncio_logger.filter(record('Executing <Task> took 0.2 seconds'))


def test_flat_train_step_equals_the_pytree_step_and_rebuilds_the_same_arrays():
  """The loop's `TrainStep` (over the state's leaves, on the 8-device FSDP mesh) computes what
  the step over the state as a pytree of Variables does, bit for bit; `unflatten` puts the very
  arrays back into Variables, with their shardings."""
  config = gpt_sgd_config(**{'mesh.fsdp': 2})
  s = loop.setup(config)
  batches = [sharding_lib.put_batch(s.family.train_batch(i), s.mesh) for i in range(2)]
  flat = loop.TrainStep(s.builder, config, s.mesh, s.shardings)
  tree = loop.jit_train_step(s.builder, config, s.mesh, s.shardings)
  leaves = flat.flatten(s.builder.init(s.shardings))
  state = s.builder.init(s.shardings)
  assert len(leaves) == len(jax.tree.leaves(state)) > 10
  for batch in batches:
    leaves, flat_metrics = flat.jitted(leaves, batch)
    state, tree_metrics = tree(state, batch)
    assert jax.device_get(flat_metrics) == jax.device_get(tree_metrics)
  rebuilt = flat.unflatten(leaves)
  assert jax.tree.structure(rebuilt) == jax.tree.structure(state)
  for got, want, kept in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(state), leaves):
    assert got is kept and got.sharding == want.sharding
    np.testing.assert_array_equal(got, want)


def test_bad_mesh_and_batch_are_user_errors(tmp_path):
  with pytest.raises(UserError, match='batch_size=12 .* not divisible by the 8 data-parallel'):
    loop.train(toy_families.regression_config(batch_size=12), str(tmp_path / 'a'))
  with pytest.raises(UserError, match='needs 6 devices'):
    loop.train(toy_families.regression_config(**{'mesh.data': 3, 'mesh.fsdp': 2}),
               str(tmp_path / 'b'))
  (tmp_path / 'file').write_text('')
  with pytest.raises(UserError, match='not a directory'):
    loop.train(toy_families.regression_config(), str(tmp_path / 'file'))


def test_fsdp_spec_rule():
  assert sharding_lib.fsdp_spec((64, 256), 8) == jax.sharding.PartitionSpec(None, 'fsdp')
  assert sharding_lib.fsdp_spec((65, 7), 8) == jax.sharding.PartitionSpec()
  assert sharding_lib.fsdp_spec((128,), 1) == jax.sharding.PartitionSpec()
