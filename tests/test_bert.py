"""BERT: masking statistics, bidirectional and padding-invariant encoder, 8 fake devices vs one,
exact resume, fill-mask and its bad input (tiny shapes, CPU).

GENLAB_RAW_DATA: the folder holding multi30k/ (CI: ../shared/data); tests reading it skip
without it.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import bert_multi30k
from models import bert as bert_lib
from tests.test_sharding import mesh_overrides, three_steps
from train import loop
from train import mlm
from train import run_loader
from train import text
from train.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_multi30k = pytest.mark.skipif(
    not os.path.isfile(os.path.join(os.environ.get('GENLAB_RAW_DATA', '/nonexistent'),
                                    'multi30k', 'train.en.gz')),
    reason='GENLAB_RAW_DATA is unset or lacks multi30k/train.en.gz')

VOCAB, SPECIAL, MASK = 50, 6, 4


# ------------------------------------------------------------------------------- masking


def test_masking_statistics_are_berts():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 31, 4000)
  ids = [rng.integers(SPECIAL, VOCAB, n).astype(np.int32) for n in lengths]
  tokens = mlm.pad_sentences(ids, 32, bos_id=1, eos_id=2, pad_id=0)
  out = mlm.mask_tokens(tokens, np.random.default_rng(1), num_special=SPECIAL, vocab_size=VOCAB,
                        mask_id=MASK)
  w = out['weights'] > 0
  rows = np.broadcast_to(np.arange(len(tokens))[:, None], w.shape)
  pos = out['positions'][w]
  # Chosen positions: real (non-special) tokens only, distinct within a row, labels = originals.
  assert np.all(tokens[rows[w], pos] >= SPECIAL)
  assert len(set(zip(rows[w].tolist(), pos.tolist()))) == w.sum()
  np.testing.assert_array_equal(out['labels'][w], tokens[rows[w], pos])
  # 15% of the non-special tokens; never more than ceil(0.15 n) in a sentence.
  assert abs(w.sum() / lengths.sum() - 0.15) < 0.005
  assert np.all(w.sum(1) <= np.ceil(0.15 * lengths))
  # Of the chosen: 80% [MASK], 10% a random token, 10% unchanged.
  new = out['tokens'][rows[w], pos]
  is_mask = new == MASK
  same = new == out['labels'][w]
  random = ~is_mask & ~same
  # A random draw hits the original token with probability 1/(VOCAB - SPECIAL): kept looks ~0.1 +.
  p_same_random = 0.1 / (VOCAB - SPECIAL)
  n = w.sum()
  assert abs(is_mask.mean() - 0.8) < 4 * np.sqrt(0.8 * 0.2 / n)
  assert abs(random.mean() - (0.1 - p_same_random)) < 4 * np.sqrt(0.1 * 0.9 / n)
  assert abs(same.mean() - (0.1 + p_same_random)) < 4 * np.sqrt(0.1 * 0.9 / n)
  assert np.all(new[random] >= SPECIAL) and np.all(new[random] < VOCAB)
  # Nothing else changed.
  untouched = np.ones(tokens.shape, bool)
  untouched[rows[w], pos] = False
  np.testing.assert_array_equal(out['tokens'][untouched], tokens[untouched])


def test_batches_are_a_pure_function_of_seed_and_step():
  tokens = mlm.pad_sentences([np.arange(6, 6 + n, dtype=np.int32) for n in range(1, 20)], 24,
                             bos_id=1, eos_id=2, pad_id=0)
  kwargs = dict(num_special=SPECIAL, vocab_size=VOCAB, mask_id=MASK)
  make = lambda **k: mlm.MaskedSentences(tokens, global_batch_size=8, seed=3, mask_kwargs=kwargs,
                                         **k)
  a, b = make(), make()
  for step in (5, 0, 5, 2):
    jax.tree.map(np.testing.assert_array_equal, a.batch(step), b.batch(step))
  # Two processes' halves are the global batch.
  halves = [make(process_index=i, process_count=2).batch(4) for i in range(2)]
  jax.tree.map(lambda x, y, z: np.testing.assert_array_equal(np.concatenate([x, y]), z),
               halves[0], halves[1], a.batch(4))
  # Every sentence once per epoch.
  seen = np.concatenate([a.indices(s) for s in range(19 * 2 // 8)])[:19]
  assert sorted(seen.tolist()) == list(range(19))


# ------------------------------------------------------------------------------ encoder


def _bert(seed=0):
  return bert_lib.BERT(vocab_size=VOCAB, max_len=16, num_layers=2, num_heads=2, embed_dim=32,
                       rngs=nnx.Rngs(seed))


def test_encoder_sees_both_directions():
  model = _bert()
  tokens = jax.random.randint(jax.random.key(0), (2, 10), SPECIAL, VOCAB)
  j = 6
  changed = tokens.at[:, j].set(SPECIAL + (tokens[:, j] - SPECIAL + 1) % (VOCAB - SPECIAL))
  a = np.asarray(model.encode(tokens)).reshape(2, 10, -1)
  b = np.asarray(model.encode(changed)).reshape(2, 10, -1)
  assert np.all(np.abs(a - b).max(axis=-1) > 1e-4)  # before j, at j and after j


def test_padding_never_changes_real_positions():
  """A padded sentence's real positions equal the unpadded sentence's (an independent
  reference: no padding at all), whatever the batch's other rows are."""
  model = _bert(1)
  sentence = jnp.array([1, 7, 8, 9, 10, 2])
  alone = np.asarray(model(sentence[None]))[0]
  padded = jnp.zeros((2, 12), jnp.int32).at[0, :6].set(sentence).at[1].set(
      jax.random.randint(jax.random.key(2), (12,), SPECIAL, VOCAB))
  np.testing.assert_allclose(np.asarray(model(padded))[0, :6], alone, rtol=0, atol=2e-5)


# ---------------------------------------------------------------------- loop: sharding, resume


def bert_sgd_config(**overrides):
  """:tiny with 8 heads (so 'tensor' can be 8), SGD + momentum, no evals."""
  c = bert_multi30k.get_config('tiny')
  c.update_from_flattened_dict({
      'total_steps': 3, 'log_every': 1, 'eval_every': 0, 'checkpoint_every': 0,
      'model.num_heads': 8, 'model.embed_dim': 64, 'model.dropout': 0.0,
      'optimizer.name': 'sgd', 'optimizer.momentum': 0.9, 'optimizer.schedule': 'constant',
      'optimizer.lr': 0.3, 'optimizer.warmup_steps': 0, 'optimizer.grad_clip': 0.0, **overrides})
  return c


@needs_multi30k
def test_sharded_on_8_devices_equals_one_device():
  ref_losses, init_state, ref_state = three_steps(bert_sgd_config(), jax.devices()[:1])
  assert ref_losses[2] < ref_losses[0] - 0.05  # it learns, or equality would prove nothing
  ref_params = jax.device_get(ref_state['params'])
  for name, mesh in [('data+fsdp+tensor', (2, 2, 2)), ('tensor', (1, 1, 8))]:
    losses, _, state = three_steps(bert_sgd_config(**mesh_overrides(*mesh)),
                                   init_state=init_state)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(state['params']), ref_params)


def _tiny(total_steps):
  c = bert_multi30k.get_config('tiny')
  c.update_from_flattened_dict({'total_steps': total_steps, 'checkpoint_every': 3,
                                'eval_every': 6, 'log_every': 1})
  return c


@pytest.fixture(scope='module')
def resumed_run(tmp_path_factory):
  """(uninterrupted result, workdir of a run stopped at step 3 and resumed to 6, its result)."""
  if not os.path.isfile(os.path.join(os.environ.get('GENLAB_RAW_DATA', '/nonexistent'),
                                     'multi30k', 'train.en.gz')):
    pytest.skip('GENLAB_RAW_DATA is unset or lacks multi30k/train.en.gz')
  root = tmp_path_factory.mktemp('bert')
  full = loop.train(_tiny(6), str(root / 'full'))
  workdir = str(root / 'resumed')
  loop.train(_tiny(3), workdir)
  second = loop.train(_tiny(6), workdir)
  return full, workdir, second


def test_resume_is_exact(resumed_run):
  full, _, second = resumed_run
  assert sorted(second.step_losses) == [4, 5, 6]
  for s in (4, 5, 6):
    assert second.step_losses[s] == full.step_losses[s], s
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(second.state),
               jax.device_get(full.state))
  # The eval at the end reports the model beside the unigram baseline.
  last = [h for h in full.history if 'eval/mlm_accuracy' in h][-1]
  assert 0 <= last['eval/mlm_accuracy'] <= 1
  assert 0 < last['eval/unigram_baseline_accuracy'] < 0.5


def test_fill_mask_and_its_bad_input(resumed_run, tmp_path):
  _, workdir, _ = resumed_run
  family, models, step = run_loader.load_models(workdir)
  assert step == 6
  out = family.fill_mask(models['model'], 'a man in a [MASK] shirt and a [MASK] hat .', top_k=4)
  assert len(out) == 2 and all(len(fillers) == 4 for fillers in out)
  for fillers in out:
    probs = [p for _, p in fillers]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
  # The probabilities are the model's softmax at the [MASK] position.
  tokens = np.concatenate([[text.BOS_ID], family.tokenizer.encode('a [MASK] .'),
                           [text.EOS_ID]])[None].astype(np.int32)
  logits = models['model'](jnp.asarray(tokens))[0, int(np.flatnonzero(tokens[0] == text.MASK_ID)[0])]
  top = family.fill_mask(models['model'], 'a [MASK] .', top_k=1)[0][0]
  np.testing.assert_allclose(top[1], float(jax.nn.softmax(logits).max()), rtol=1e-5)

  for prompt, top_k, message in (
      ('a man in a red shirt .', 5, 'needs at least one \\[MASK\\]'),
      ('', 5, 'needs at least one \\[MASK\\]'),
      ('a [MASK] ' + 'very ' * 40, 5, 'the model reads at most 22'),
      ('a [MASK] .', 0, '--top_k=0')):
    with pytest.raises(UserError, match=message):
      family.sample(models, jax.random.key(0), workdir, {'prompt': prompt, 'top_k': top_k})
  with pytest.raises(UserError, match='--prompt is required'):
    family.sample(models, jax.random.key(0), workdir, {'prompt': None, 'top_k': None})

  # The command line: one line naming the culprit, no traceback.
  proc = subprocess.run(
      [sys.executable, '-m', 'train.sample', f'--workdir={workdir}', '--prompt=a red shirt .'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "error: --prompt='a red shirt .': needs at least one [MASK]"), proc.stderr


def test_missing_or_damaged_tokenizer_is_one_line(resumed_run, tmp_path):
  _, workdir, _ = resumed_run
  copy = tmp_path / 'copy'
  os.makedirs(copy)
  for name in ('config.json', 'family.json'):
    with open(os.path.join(workdir, name), encoding='utf-8') as f:
      (copy / name).write_text(f.read(), encoding='utf-8')
  os.symlink(os.path.join(workdir, 'checkpoints'), copy / 'checkpoints')
  with pytest.raises(UserError, match='tokenizer file missing'):
    run_loader.load_models(str(copy))
  (copy / text.TOKENIZER_FILE).write_text('{"not": "a tokenizer"', encoding='utf-8')
  with pytest.raises(UserError, match='damaged tokenizer file'):
    run_loader.load_models(str(copy))
