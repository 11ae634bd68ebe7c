"""Fine-tuning: LoRA identities (zero B, merge), frozen params and their (absent) optimizer
state, init_from across meshes, exact resume of a LoRA run, LoRA+ against per-group AdamW,
tuned checkpoints that hold only what was trained (restored through their base run), LoRA
under tensor parallelism, export, and one-line bad inputs."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from experiments.configs import gpt_shakespeare
from models import gpt
from models import layers
from models import lora as lora_lib
from tests import toy_families
from tests.test_sharding import gpt_config as sharding_gpt_config
from tests.test_sharding import mesh_overrides, three_steps
from train import checkpoint as ckpt_lib
from train import export
from train import loop
from train import run_loader
from train import tune
from train.errors import UserError

needs_tfds = pytest.mark.skipif(not os.environ.get('TFDS_DATA_DIR'),
                                reason='TFDS_DATA_DIR (a prepared data_dir) is not set')

TARGETS = r'(attn/(qkv|proj)|mlp/(fc|proj))$'


def tiny_gpt(seed=0):
  return gpt.GPT(vocab_size=23, block_size=8, num_layers=2, num_heads=2, embed_dim=16,
                 rngs=nnx.Rngs(seed))


def tokens():
  return jax.random.randint(jax.random.key(5), (2, 8), 0, 23, dtype=jnp.int32)


def toy(**overrides):
  """The toy regression MLP (l1: 1 -> 32, l2: 32 -> 1) with Adam, as fine-tuning tests need."""
  return toy_families.regression_config(**{
      'optimizer.name': 'adam', 'optimizer.lr': 1e-2, **overrides})


def leaves_by_path(tree):
  return {jax.tree_util.keystr(p, simple=True, separator='/'): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def saved_array_paths(step_dir):
  """The arrays Orbax wrote at a checkpoint step, read from its own metadata file."""
  with open(os.path.join(step_dir, 'state', '_METADATA'), encoding='utf-8') as f:
    tree = json.load(f)['tree_metadata']
  return sorted('/'.join(str(k['key']) for k in leaf['key_metadata']).removesuffix('/value')
                for leaf in tree.values() if leaf['value_metadata']['value_type'] == 'jax.Array')


def disk_bytes(directory):
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, files in os.walk(directory) for name in files)


# ------------------------------------------------------------------------------ LoRA math


def test_lora_with_zero_b_equals_base_exactly():
  model = tiny_gpt()
  base = np.asarray(model(tokens()))
  wrapped = lora_lib.apply_lora(model, targets=TARGETS, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
  assert len(wrapped) == 8  # 2 blocks x (qkv, proj, fc, proj)
  lora = model.blocks[0].attn.qkv.lora
  assert isinstance(lora.lora_b, nnx.LoRAParam) and not np.any(lora.lora_b[...])
  np.testing.assert_array_equal(np.asarray(model(tokens())), base)


def test_lora_linear_and_merge_against_numpy():
  model = tiny_gpt()
  lora_lib.apply_lora(model, targets=TARGETS, rank=2, alpha=3.0, rngs=nnx.Rngs(1))
  keys = iter(jax.random.split(jax.random.key(9), 16))
  for block in model.blocks:
    for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
      layer.lora.lora_b[...] = jax.random.normal(next(keys), layer.lora.lora_b.shape)
  # One adapted layer by hand: x W + b + (alpha / rank) x A B.
  layer = model.blocks[1].mlp.fc
  x = np.asarray(jax.random.normal(jax.random.key(2), (5, 16)), np.float64)
  w, b = np.asarray(layer.kernel[...], np.float64), np.asarray(layer.bias[...], np.float64)
  a, bb = (np.asarray(layer.lora.lora_a[...], np.float64),
           np.asarray(layer.lora.lora_b[...], np.float64))
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x, jnp.float32))),
                             x @ w + b + 1.5 * (x @ a @ bb), rtol=1e-5, atol=1e-5)
  adapted = np.asarray(model(tokens()))
  lora_lib.merge_lora(model)
  assert type(model.blocks[1].mlp.fc) is nnx.Linear
  plain = nnx.state(tiny_gpt(), nnx.Param)  # the merged model has the base model's param tree
  assert jax.tree.structure(nnx.state(model, nnx.Param)) == jax.tree.structure(plain)
  # float32: W + s A B rounds differently from the two products summed.
  np.testing.assert_allclose(np.asarray(model(tokens())), adapted, rtol=1e-4, atol=1e-4)
  assert np.abs(adapted).max() > 0.1


def test_lora_embedding_against_numpy_and_merge():
  # The token table of a GPT whose output layer is tied to it: E -> E + (alpha / rank) A B,
  # in the lookup and in the logits. Reference: numpy's float64 forward of the tied head.
  model = tiny_gpt()
  base = np.asarray(model(tokens()))
  wrapped = lora_lib.apply_lora(model, targets=r'(wte|wpe|attn/qkv)$', rank=4, alpha=8.0,
                                rngs=nnx.Rngs(1), embed_rank=2)
  assert wrapped == ['blocks/0/attn/qkv', 'blocks/1/attn/qkv', 'wpe', 'wte']
  lora = model.wte.lora
  assert (lora.lora_a.shape, lora.lora_b.shape) == ((23, 2), (2, 16))
  assert model.wte.scale == 2.0  # alpha / rank kept at the embedding's own rank: 4 / 2
  assert isinstance(lora.lora_a, nnx.LoRAParam) and not np.any(lora.lora_a[...])
  np.testing.assert_array_equal(np.asarray(model(tokens())), base)  # A = 0: the base exactly
  lora.lora_a[...] = jax.random.normal(jax.random.key(3), lora.lora_a.shape)
  e, a, bb = (np.asarray(x, np.float64) for x in (
      model.wte.embedding[...], lora.lora_a[...], lora.lora_b[...]))
  table = e + 2.0 * a @ bb
  ids = np.asarray(tokens())
  np.testing.assert_allclose(np.asarray(model.wte(tokens())), table[ids], rtol=1e-5, atol=1e-5)
  h = np.asarray(jax.random.normal(jax.random.key(4), (5, 16)), np.float64)
  np.testing.assert_allclose(np.asarray(layers.tied_logits(jnp.asarray(h, jnp.float32),
                                                           model.wte)),
                             h @ table.T, rtol=1e-4, atol=1e-4)
  with_wte = np.asarray(model(tokens()))
  # The position table too (the model reads it by index, not by lookup): merged must agree.
  model.wpe.lora.lora_a[...] = jax.random.normal(jax.random.key(6), model.wpe.lora.lora_a.shape)
  adapted = np.asarray(model(tokens()))
  assert np.abs(adapted - with_wte).max() > 0.1 and np.abs(with_wte - base).max() > 0.1
  lora_lib.merge_lora(model)
  assert type(model.wte) is nnx.Embed and type(model.wpe) is nnx.Embed
  assert jax.tree.structure(nnx.state(model, nnx.Param)) == jax.tree.structure(
      nnx.state(tiny_gpt(), nnx.Param))
  np.testing.assert_allclose(np.asarray(model.wte.embedding[...]), table, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(model(tokens())), adapted, rtol=1e-4, atol=1e-4)


def test_dora_with_zero_b_equals_base_exactly_and_against_numpy():
  model = tiny_gpt()
  forward = nnx.jit(lambda m, t: m(t))
  base, base_eager = np.asarray(forward(model, tokens())), np.asarray(model(tokens()))
  lora_lib.apply_lora(model, targets=TARGETS, rank=2, alpha=3.0, rngs=nnx.Rngs(1), dora=True)
  layer = model.blocks[1].mlp.fc
  gain = layer.lora.lora_magnitude
  assert isinstance(gain, nnx.LoRAParam) and gain.shape == (64,) and np.all(gain[...] == 1)
  assert re.search(tune.LORA_PARAMS, 'model/blocks/1/mlp/fc/lora/lora_magnitude')
  # B = 0: the base model, bit for bit, jitted and eager.
  np.testing.assert_array_equal(np.asarray(forward(model, tokens())), base)
  np.testing.assert_array_equal(np.asarray(model(tokens())), base_eager)
  keys = iter(jax.random.split(jax.random.key(9), 32))
  for block in model.blocks:
    for m in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
      m.lora.lora_b[...] = jax.random.normal(next(keys), m.lora.lora_b.shape)
      m.lora.lora_magnitude[...] = 1 + 0.5 * jax.random.normal(next(keys), (m.out_features,))
  # One layer by hand (the paper's eq. 5): W' = m V / ||V||, V = W + (alpha / rank) A B, the
  # norms over the input axis, m = g ||W||; y = x W' + b.
  x = np.asarray(jax.random.normal(jax.random.key(2), (5, 16)), np.float64)
  w, b, a, bb, g = (np.asarray(v[...], np.float64) for v in (
      layer.kernel, layer.bias, layer.lora.lora_a, layer.lora.lora_b, layer.lora.lora_magnitude))
  v = w + 1.5 * a @ bb
  adapted_w = g * np.linalg.norm(w, axis=0) * v / np.linalg.norm(v, axis=0)
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x, jnp.float32))), x @ adapted_w + b,
                             rtol=1e-5, atol=1e-5)
  adapted = np.asarray(forward(model, tokens()))
  assert np.abs(adapted - base).max() > 0.1
  lora_lib.merge_lora(model)
  assert type(model.blocks[1].mlp.fc) is nnx.Linear
  np.testing.assert_allclose(np.asarray(model.blocks[1].mlp.fc.kernel[...]), adapted_w,
                             rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(nnx.state(model, nnx.Param)) == jax.tree.structure(
      nnx.state(tiny_gpt(), nnx.Param))
  np.testing.assert_allclose(np.asarray(model(tokens())), adapted, rtol=1e-4, atol=1e-4)
  # A column of zeros (a pruned output) stays finite, and so does its gradient.
  linear = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  linear.kernel[...] = linear.kernel[...].at[:, 1].set(0.0)
  dora = lora_lib.LoRALinear(linear, rank=1, alpha=1.0, rngs=nnx.Rngs(1), dora=True)
  x = jnp.ones((2, 4))
  np.testing.assert_array_equal(np.asarray(dora(x)), np.asarray(linear(x)))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(dora)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_lora_rank_out_of_range():
  for rank in (0, 17):
    with pytest.raises(ValueError, match=f'LoRA rank {rank} must be in'):
      lora_lib.apply_lora(tiny_gpt(), targets=TARGETS, rank=rank, alpha=1.0, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match=r'LoRA rank 17 must be in \[1, min\(rows, features\) = '
                     r'16\] for an Embed 23 x 16'):
    lora_lib.apply_lora(tiny_gpt(), targets='wte$', rank=2, alpha=1.0, rngs=nnx.Rngs(1),
                        embed_rank=17)


# ------------------------------------------------------------------------ frozen params


def test_frozen_params_unchanged_and_without_optimizer_state(tmp_path):
  # Under FSDP (params split over 8 devices, gathered in the step) with gradient accumulation.
  config = toy(trainable='model/l2/', ema_decay=0.9, total_steps=3, grad_accum_steps=2,
               **{'mesh.data': 1, 'mesh.fsdp': -1})
  setup = loop.setup(config)
  init = jax.device_get(setup.builder.init(setup.shardings))
  result = loop.train(config, str(tmp_path / 'run'))
  after = leaves_by_path(result.state)
  before = leaves_by_path(init)
  for path in before:
    if path.startswith(('params/model/l1/', 'ema/model/l1/')):
      assert after[path].tobytes() == before[path].tobytes(), path  # bit for bit
    elif path.startswith(('params/model/l2/', 'ema/model/l2/')):
      assert not np.array_equal(after[path], before[path]), path  # these did train
  # Adam's two moments for l2's kernel and bias only; nothing of l1.
  opt = [x.shape for x in jax.tree.leaves(result.state['opt']) if x.ndim]
  assert sorted(opt) == sorted([(32, 1), (1,)] * 2)
  assert not any('l1' in p for p in leaves_by_path(result.state['opt']))


def test_lora_trains_only_adapters_with_exact_resume(tmp_path):
  overrides = {'lora.rank': 1, 'lora.targets': r'model/l[12]$', 'trainable': 'lora',
               'init_from': str(tmp_path / 'base'), 'ema_decay': 0.5}
  base = loop.train(toy(total_steps=3), str(tmp_path / 'base'))
  full = loop.train(toy(total_steps=6, **overrides), str(tmp_path / 'full'))
  workdir = str(tmp_path / 'resumed')
  first = loop.train(toy(total_steps=3, **overrides), workdir)
  # A workdir with its own checkpoint resumes from it: init_from is not even read.
  second = loop.train(toy(total_steps=6, **{**overrides, 'init_from': '/nonexistent'}), workdir)
  assert sorted(second.step_losses) == [4, 5, 6]
  for s in range(1, 7):
    assert (first.step_losses | second.step_losses)[s] == full.step_losses[s], s
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(second.state),
               jax.device_get(full.state))
  # The base weights are the base run's, bit for bit; the adapters moved.
  tuned, started = leaves_by_path(full.state['params']), leaves_by_path(base.state['params'])
  for path, value in started.items():
    assert tuned[path].tobytes() == value.tobytes(), path
  assert np.abs(tuned['model/l2/lora/lora_b/value']).max() > 0
  opt = {x.shape for x in jax.tree.leaves(full.state['opt']) if x.ndim}
  assert opt == {(1, 1), (1, 32), (32, 1)}  # l1: A [1, 1], B [1, 32]; l2: A [32, 1], B [1, 1]


def test_dora_in_the_loop_starts_at_its_base_and_trains_adapters_and_magnitudes(tmp_path):
  # The adapters are made before init_from loads the base, so a magnitude kept as its own
  # number (not a gain on the base's norms) would start from the random init's norms.
  lora = {'lora.rank': 1, 'lora.targets': r'model/l[12]$', 'trainable': 'lora',
          'init_from': str(tmp_path / 'base'), 'total_steps': 2}
  base = loop.train(toy(total_steps=3), str(tmp_path / 'base'))
  plain = loop.train(toy(**lora), str(tmp_path / 'plain'))
  dora = loop.train(toy(**lora, **{'lora.dora': True}), str(tmp_path / 'dora'))
  # Step 1's loss is the starting model's on the same batch: the base, for both.
  assert dora.step_losses[1] == plain.step_losses[1]
  assert dora.step_losses[2] != plain.step_losses[2]
  tuned, started = leaves_by_path(dora.state['params']), leaves_by_path(base.state['params'])
  for path, value in started.items():
    assert tuned[path].tobytes() == value.tobytes(), path
  for layer in ('l1', 'l2'):
    assert not np.all(tuned[f'model/{layer}/lora/lora_magnitude/value'] == 1), layer
  opt = {x.shape for x in jax.tree.leaves(dora.state['opt']) if x.ndim}
  assert opt == {(1, 1), (1, 32), (32, 1), (32,), (1,)}   # A, B and a magnitude per layer


def test_lora_plus_equals_adamw_with_a_larger_learning_rate_on_b():
  # The reference: two AdamW optimizers, one per parameter group (as PyTorch's param groups
  # do LoRA+), B's at lambda times A's learning rate; the bias keeps the base rate.
  lr, ratio, wd = 1e-2, 16.0, 0.1
  config = toy(**{'lora.rank': 1, 'lora.b_lr_ratio': ratio})
  keys = jax.random.split(jax.random.key(0), 4)
  params = {'net': {'l1': {'bias': jax.random.normal(keys[0], (3,)),
                           'lora': {'lora_a': jax.random.normal(keys[1], (4, 2)),
                                    'lora_b': jax.random.normal(keys[2], (2, 3))}}}}
  tx = tune.lora_plus(config, optax.adamw(lr, weight_decay=wd))
  groups = {'a': optax.adamw(lr, weight_decay=wd), 'b': optax.adamw(ratio * lr, weight_decay=wd)}
  ours, state = dict(params), tx.init(params)
  theirs = {k: jax.tree.map(lambda x: x, params) for k in groups}
  states = {k: groups[k].init(theirs[k]) for k in groups}
  for step in range(5):
    grads = jax.tree.map(lambda x, k=jax.random.fold_in(keys[3], step): jax.random.normal(
        k, x.shape), params)
    updates, state = tx.update(grads, state, ours)
    ours = optax.apply_updates(ours, updates)
    for k in groups:
      updates, states[k] = groups[k].update(grads, states[k], theirs[k])
      theirs[k] = optax.apply_updates(theirs[k], updates)
  lora_ours, lora_a, lora_b = (t['net']['l1'] for t in (ours, theirs['a'], theirs['b']))
  np.testing.assert_allclose(lora_ours['lora']['lora_b'], lora_b['lora']['lora_b'], rtol=1e-6)
  np.testing.assert_allclose(lora_ours['lora']['lora_a'], lora_a['lora']['lora_a'], rtol=1e-6)
  np.testing.assert_allclose(lora_ours['bias'], lora_a['bias'], rtol=1e-6)
  assert not np.allclose(lora_a['lora']['lora_b'], lora_b['lora']['lora_b'])  # lambda matters


def test_lora_plus_in_the_loop_scales_b_first_step(tmp_path):
  # From B = 0, A's first gradient is zero and Adam's first step moves B by lr x g / (|g| +
  # eps) per entry: LoRA+ moves it lambda times as far, and A stays where it started.
  overrides = {'lora.rank': 1, 'lora.targets': r'model/l[12]$', 'trainable': 'lora',
               'total_steps': 1}
  plain = leaves_by_path(loop.train(toy(**overrides), str(tmp_path / 'plain')).state['params'])
  plus = leaves_by_path(loop.train(toy(**overrides, **{'lora.b_lr_ratio': 4.0}),
                                   str(tmp_path / 'plus')).state['params'])
  for layer in ('l1', 'l2'):
    b = f'model/{layer}/lora/lora_b/value'
    assert np.abs(plain[b]).max() > 0
    np.testing.assert_allclose(plus[b], 4.0 * plain[b], rtol=1e-5)
    a = f'model/{layer}/lora/lora_a/value'
    np.testing.assert_array_equal(plus[a], plain[a])


def test_tuned_checkpoint_holds_only_what_trained_and_restores_through_its_base(tmp_path):
  base_dir, tuned_dir = str(tmp_path / 'base'), str(tmp_path / 'tuned')
  # A 200,000-float frozen param (the 'ballast') makes the base's checkpoint big.
  base = loop.train(toy(total_steps=2, ballast=200_000), base_dir)
  lora = {'lora.rank': 1, 'lora.targets': r'model/l[12]$', 'trainable': 'lora',
          'ema_decay': 0.5, 'ballast': 200_000}
  tuned = loop.train(toy(total_steps=3, init_from=base_dir, **lora), tuned_dir)
  step_dir = os.path.join(tuned_dir, 'checkpoints', '3')
  saved = saved_array_paths(step_dir)
  adapters = [f'model/{layer}/lora/lora_{m}' for layer in ('l1', 'l2') for m in 'ab']
  assert [p for p in saved if p.startswith(('params/', 'ema/'))] == [
      f'{group}/{a}' for group in ('ema', 'params') for a in adapters]
  assert not any(re.search(r'ballast|l[12]/(kernel|bias)$', p) for p in saved), saved
  assert 'step' in saved and sum('/mu/' in p for p in saved) == 4  # Adam: adapters only
  # Its size: a fraction of the base's, as measured on disk and as logged.
  base_bytes, tuned_bytes = (disk_bytes(os.path.join(base_dir, 'checkpoints', '2')),
                             disk_bytes(step_dir))
  assert tuned_bytes < base_bytes / 10, (tuned_bytes, base_bytes)
  assert ckpt_lib.step_bytes(os.path.join(tuned_dir, 'checkpoints'), 3) == tuned_bytes
  row = [h for h in tuned.history if 'checkpoint_bytes' in h][-1]
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(jax.device_get(tuned.state['opt'])))
  assert row['checkpoint_bytes'] == tuned_bytes and row['opt_state_bytes'] == opt_bytes
  assert opt_bytes < sum(x.nbytes for x in jax.tree.leaves(jax.device_get(base.state['opt'])))

  # train.sample's loader rebuilds the whole model: the state the run ended with, bit for bit.
  for use_ema, group in ((True, 'ema'), (False, 'params')):
    _, models, step = run_loader.load_models(tuned_dir, use_ema=use_ema)
    loaded = leaves_by_path(nnx.state(models['model'], nnx.Param))
    want = leaves_by_path(tuned.state[group]['model'])
    assert step == 3 and sorted(loaded) == sorted(want)
    for path, value in want.items():
      assert loaded[path].tobytes() == value.tobytes(), (group, path)
  # A run started from the tuned run reads the base's params through it.
  setup = loop.setup(toy(init_from=tuned_dir, **lora))
  state, resolved, fresh = tune.load_init(tuned_dir, setup.builder.init(setup.shardings),
                                          setup.shardings, setup.family.metadata())
  assert resolved == f'{tuned_dir}:3' and fresh == []
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state['params']),
               jax.device_get(tuned.state['params']))

  # Without its base run, restoring fails in one line naming it; nothing is deleted.
  moved = str(tmp_path / 'moved')
  os.rename(base_dir, moved)
  message = (rf'checkpoints/3 \(trained params only\) needs its base run '
             rf'{re.escape(base_dir)}:2 for the frozen ones: no checkpoint in ')
  with pytest.raises(UserError, match=message) as error:
    run_loader.load_models(tuned_dir)
  assert '\n' not in str(error.value)
  with pytest.raises(UserError, match=message):
    loop.train(toy(total_steps=4, init_from=base_dir, **lora), tuned_dir)
  assert saved_array_paths(step_dir) == saved and os.listdir(
      os.path.join(tuned_dir, 'checkpoints')) == ['3']
  os.rename(moved, base_dir)
  assert run_loader.load_models(tuned_dir)[2] == 3


# --------------------------------------------------------------------------------- init_from


def test_init_from_8_devices_onto_4(tmp_path):
  overrides = {'mesh.data': 1, 'mesh.fsdp': -1, 'hidden': 64}
  base = loop.train(toy(total_steps=2, **overrides), str(tmp_path / 'base'))
  assert len(base.state['params']['model']['l1']['kernel'][...].sharding.device_set) == 8
  config = toy(init_from=str(tmp_path / 'base'), **{'lora.rank': 1,
                                                    'lora.targets': 'l2$', **overrides})
  setup = loop.setup(config, jax.devices()[:4])
  fresh = setup.builder.init(setup.shardings)
  fresh_host = leaves_by_path(fresh)
  state, resolved, new = tune.load_init(config.init_from, fresh, setup.shardings,
                                        setup.family.metadata())
  assert resolved == f'{tmp_path / "base"}:2'
  assert new == ['params/model/l2/lora/lora_a', 'params/model/l2/lora/lora_b']
  kernel = state['params']['model']['l1']['kernel'][...]
  assert len(kernel.sharding.device_set) == 4 and kernel.addressable_shards[0].data.shape == (1, 16)
  loaded, want = leaves_by_path(state), leaves_by_path(base.state)
  for path, value in loaded.items():
    if 'lora' in path:
      np.testing.assert_array_equal(value, fresh_host[path])  # new: keeps its init
    elif path.startswith(('params/', 'ema/')):
      np.testing.assert_array_equal(value, want[path.replace('ema/', 'params/', 1)])
  # An earlier step by DIR:STEP, recorded in config.json with the step.
  loop.train(toy(total_steps=1, checkpoint_every=1), str(tmp_path / 'steps'))
  run = loop.train(toy(total_steps=2, init_from=f'{tmp_path / "steps"}:1'), str(tmp_path / 't'))
  assert f'"init_from": "{tmp_path / "steps"}:1"' in (tmp_path / 't' / 'config.json').read_text()
  assert sorted(run.step_losses) == [1, 2]


def test_base_metadata_must_state_this_runs_facts_alike():
  ours = {'vocab_size': 300, 'tokenizer': 'subword'}
  assert tune.metadata_fits({'vocab_size': 300, 'tokenizer': 'subword', 'extra': 0.5}, ours)
  assert not tune.metadata_fits({'vocab_size': 301, 'tokenizer': 'subword'}, ours)
  assert not tune.metadata_fits({'vocab_size': 300}, ours)   # a fact the base does not state
  assert not tune.metadata_fits({'chars': 'ab'}, {'chars': ('a', 'b', 'c')})
  assert not tune.metadata_fits([], {})
  assert tune.metadata_fits({'chars': ['a', 'b']}, {'chars': ('a', 'b')})  # as JSON stores it


@pytest.mark.parametrize('overrides, message', [
    ({'init_from': 'EMPTY'}, r'config.init_from=.*empty: no checkpoint in .*empty/checkpoints$'),
    ({'init_from': 'BASE:7'}, r'no checkpoint at step 7 \(steps: \[2\]\)'),
    ({'init_from': 'BASE', 'hidden': 16}, r"params do not fit this model \(params/model/l1/bias: "
     r'\[32\] in the base run, \[16\] here; .*l1/kernel.*l2/kernel.*\)$'),
    ({'trainable': 'nothing'}, r"config.trainable='nothing': matches no parameter"),
    ({'trainable': 'lora'}, r'set config.lora.rank >= 1'),
    ({'lora.rank': 2, 'lora.targets': 'l[12]$'}, r'config.lora.rank=2: LoRA rank 2 must be in \[1, min\(in, out\) = 1\]'),
    ({'lora.rank': 1, 'lora.embed_rank': -1}, r'config.lora.embed_rank=-1: must be >= 0'),
    ({'lora.rank': 1, 'lora.b_lr_ratio': 0.0}, r'config.lora.b_lr_ratio=0.0: must be > 0'),
    ({'lora.rank': 1, 'lora.targets': 'qkv'}, r"matches no nnx.Linear or nnx.Embed module \(their paths: "
     r'model/l1, model/l2\)'),
])
def test_bad_inputs_are_one_line_user_errors(tmp_path, overrides, message):
  (tmp_path / 'empty').mkdir()
  if 'BASE' in str(overrides.get('init_from')):
    loop.train(toy(total_steps=2), str(tmp_path / 'base'))
  overrides = {k: v.replace('EMPTY', str(tmp_path / 'empty')).replace('BASE', str(
      tmp_path / 'base')) if isinstance(v, str) else v for k, v in overrides.items()}
  with pytest.raises(UserError, match=message) as error:
    loop.train(toy(**overrides), str(tmp_path / 'run'))
  assert '\n' not in str(error.value)
  assert not (tmp_path / 'run' / 'checkpoints').exists() or not os.listdir(
      tmp_path / 'run' / 'checkpoints')


# ------------------------------------------------------------------------- GPT end to end


@needs_tfds
def test_gpt_lora_from_base_then_export_merged(tmp_path):
  def config(**overrides):
    c = gpt_shakespeare.get_config('tiny')
    c.update_from_flattened_dict({'total_steps': 2, 'log_every': 1, 'eval_every': 0,
                                  'checkpoint_every': 0, 'sample_tokens': 4, **overrides})
    return c

  one = jax.devices()[:1]
  base = loop.train(config(), str(tmp_path / 'base'), devices=one)
  run = str(tmp_path / 'lora')
  tuned = loop.train(config(**{'init_from': str(tmp_path / 'base'), 'lora.rank': 2,
                               'lora.alpha': 4.0, 'trainable': 'lora', 'lora.embed_rank': 1,
                               'lora.targets': TARGETS[:-2] + '|wte)$',
                               'optimizer.lr': 0.05, 'optimizer.warmup_steps': 0}), run,
                     devices=one)
  before, after = leaves_by_path(base.state['params']), leaves_by_path(tuned.state['params'])
  for path, value in before.items():
    assert after[path].tobytes() == value.tobytes(), path
  # A and B x (4 Linears x 2 blocks + the token table)
  assert sum('lora' in p for p in after) == 2 * (4 * 2 + 1)
  assert after['model/wte/lora/lora_a/value'].shape[1] == 1
  for path in ('blocks/1/mlp/fc/lora/lora_b', 'wte/lora/lora_a'):  # the zero factors trained
    assert np.abs(after[f'model/{path}/value']).max() > 0, path
  # Its checkpoint holds the adapters, not the GPT. The reference: the same run directory with
  # a checkpoint of the whole final state; sampling and evaluating both must agree exactly.
  assert all('/lora/' in p for p in saved_array_paths(os.path.join(run, 'checkpoints', '2'))
             if p.startswith('params/'))
  everything = str(tmp_path / 'everything')
  shutil.copytree(run, everything, ignore=shutil.ignore_patterns('checkpoints'))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(everything, 'checkpoints'), async_save=False)
  checkpointer.save(2, tuned.state, {'data_step': 2, 'family': 'gpt'})
  checkpointer.close()
  assert disk_bytes(os.path.join(run, 'checkpoints', '2')) < disk_bytes(
      os.path.join(everything, 'checkpoints', '2'))  # (Orbax's metadata dominates at this size)
  outputs = []
  for workdir in (run, everything):
    family, models, step = run_loader.load_models(workdir)
    text = family.sample(models, jax.random.key(4), workdir,
                         {**{k: None for k in family.sample_flags}, 'max_new_tokens': 24})
    report = str(tmp_path / f'{os.path.basename(workdir)}.json')
    family.evaluate(models, workdir, step, {'report': report})
    with open(report, encoding='utf-8') as f:
      outputs.append((text, {k: v for k, v in json.load(f).items() if k != 'workdir'}))
  assert outputs[0] == outputs[1] and len(outputs[0][0]) > 10
  out = str(tmp_path / 'merged')
  export.merge_lora_run(run, out)
  _, lora_models, _ = run_loader.load_models(run)
  family, merged_models, step = run_loader.load_models(out)
  assert step == 2 and not any('lora' in p for p in leaves_by_path(
      nnx.state(merged_models['model'], nnx.Param)))
  batch = jax.random.randint(jax.random.key(3), (2, 32), 0, family.tokenizer.vocab_size)
  np.testing.assert_allclose(np.asarray(merged_models['model'](batch)),
                             np.asarray(lora_models['model'](batch)), rtol=1e-4, atol=1e-4)
  with pytest.raises(UserError, match='already holds a run'):
    export.merge_lora_run(run, out)
  with pytest.raises(UserError, match='not a LoRA run'):
    export.merge_lora_run(str(tmp_path / 'base'), str(tmp_path / 'other'))


@needs_tfds
@pytest.mark.parametrize('dora', [False, True])
def test_gpt_lora_tensor_parallel_equals_one_device(dora):
  lora = {'lora.rank': 2, 'trainable': 'lora', 'lora.dora': dora}
  ref_losses, init_state, _ = three_steps(sharding_gpt_config(**lora), jax.devices()[:1])
  assert ref_losses[2] < ref_losses[0] - 0.01  # the adapters learn
  losses, _, state = three_steps(sharding_gpt_config(**lora, **mesh_overrides(4, 1, 2)),
                                 init_state=init_state)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
  # Adapters follow their kernel: B split by columns under the column-split qkv and fc, A by
  # rows under the row-split output projections; the other factor replicated.
  block = state['params']['model']['blocks'][0]
  for layer, a_spec, b_spec in ((block['attn']['qkv'], P(), P(None, 'tensor')),
                                (block['mlp']['fc'], P(), P(None, 'tensor')),
                                (block['attn']['proj'], P('tensor'), P()),
                                (block['mlp']['proj'], P('tensor'), P())):
    assert layer['lora']['lora_a'][...].sharding.spec == a_spec
    assert layer['lora']['lora_b'][...].sharding.spec == b_spec
    if dora:   # a magnitude per output column, split where the columns are
      assert layer['lora']['lora_magnitude'][...].sharding.spec == (
          P('tensor') if b_spec == P(None, 'tensor') else P())
