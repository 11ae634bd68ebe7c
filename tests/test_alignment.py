"""Alignment to preferences: the hidden chrF judge and its pair files, the reward model's
Bradley-Terry loss, DPO's loss and step, and DPO runs (one device vs 8, exact resume) started
from a tiny instruction-tuned run trained in the test on a slice of Multi30k."""

import gzip
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu
from flax import nnx

from experiments.configs import dpo_gpt
from experiments.configs import gpt_instruct
from experiments.configs import reward_gpt
from models import gpt
from models import scalar_head
from train import loop
from train import preferences
from train import run_loader
from train import text as text_lib
from train.errors import UserError
from train.families import dpo as dpo_lib
from train.families import reward as reward_lib

RAW = os.environ.get('GENLAB_RAW_DATA', '')
needs_multi30k = pytest.mark.skipif(
    not os.path.isfile(os.path.join(RAW, 'multi30k', 'train.en.gz')),
    reason='GENLAB_RAW_DATA (Multi30k) is needed')


# ------------------------------------------------------------------------------- the judge


def test_judge_chrf_and_preference_probability_against_independent_formulas():
  hyp, ref = 'Ein Mann fährt ein rotes Fahrrad.', 'Ein Mann fährt Fahrrad.'
  assert preferences.chrf(hyp, ref) == pytest.approx(
      sacrebleu.metrics.CHRF().sentence_score(hyp, [ref]).score, abs=1e-12)
  for a, b, t in [(40.0, 30.0, 5.0), (30.0, 40.0, 5.0), (12.5, 12.5, 2.0), (90.0, 1.0, 0.5),
                  (1.0, 90.0, 0.5)]:
    want = 1.0 / (1.0 + np.exp(-np.float64(a - b) / t))
    assert preferences.preference_probability(a, b, t) == pytest.approx(want, rel=1e-12)
  assert [preferences.preference_probability(a, b, 0.0)
          for a, b in [(2.0, 1.0), (1.0, 2.0), (1.0, 1.0)]] == [1.0, 0.0, 0.5]
  # The noisy judge prefers the higher-chrF response with about the probability it states.
  refs = ['ein hund läuft'] * 4000
  pairs = [('ein hund läuft', 'ein hund')] * 4000
  verdicts = preferences.judge(pairs, refs, 20.0, np.random.default_rng(0))
  p = verdicts[0]['p_first']
  assert 0.6 < p < 0.95
  assert abs(np.mean([v['chosen'] == 0 for v in verdicts]) - p) < 0.03
  with pytest.raises(UserError, match='judge_temperature'):
    preferences.preference_probability(1.0, 0.0, -1.0)


# ------------------------------------------------------------------ the response sampler


def test_sample_continue_rows_depend_only_on_their_key_and_prompt():
  """A row sampled in a batch of ragged prompts equals the row sampled alone (its padding and
  neighbours change nothing); temperature 0 is greedy_continue."""
  model = tiny_gpt()
  prompts = np.array([[1, 2, 3, 4], [5, 6, 0, 0], [7, 0, 0, 0]], np.int32)
  lengths = np.array([4, 2, 1], np.int32)
  keys = jax.random.split(jax.random.key(3), 3)
  batch = np.asarray(gpt.sample_continue(model, prompts, lengths, keys, max_new_tokens=6))
  for i in range(3):
    alone = gpt.sample_continue(model, prompts[i:i + 1, :lengths[i]], lengths[i:i + 1],
                                keys[i:i + 1], max_new_tokens=6)
    np.testing.assert_array_equal(batch[i], np.asarray(alone)[0])
  other = gpt.sample_continue(model, prompts, lengths, jax.random.split(jax.random.key(4), 3),
                              max_new_tokens=6)
  assert not np.array_equal(batch, np.asarray(other))
  np.testing.assert_array_equal(
      gpt.sample_continue(model, prompts, lengths, keys, max_new_tokens=6, temperature=0.0),
      gpt.greedy_continue(model, prompts, lengths, max_new_tokens=6))


# ------------------------------------------------------------------ losses on tiny models


def tiny_gpt(cls=gpt.GPT, seed=0):
  return cls(vocab_size=29, block_size=16, num_layers=2, num_heads=2, embed_dim=16,
             rngs=nnx.Rngs(seed))


def pair_batch(n=4, seq=12, vocab=29, seed=0):
  """inputs, targets, weights `[n, 2, seq]`: random tokens; the response (weights) starts after
  a prompt of 3-5 tokens and runs for 2-6 tokens."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (n, 2, seq + 1)).astype(np.int32)
  weights = np.zeros((n, 2, seq), np.float32)
  for i in range(n):
    for j in range(2):
      start = int(rng.integers(2, 5))
      weights[i, j, start:start + int(rng.integers(2, 7))] = 1.0
  return {'inputs': tokens[..., :-1], 'targets': tokens[..., 1:], 'weights': weights}


def numpy_response_log_probs(model, batch):
  """`[n, 2]`: each response's summed log-probability, from the full logits in numpy."""
  n, _, seq = batch['inputs'].shape
  logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, batch['inputs'].reshape(2 * n, seq)),
                      np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  picked = np.take_along_axis(logp, batch['targets'].reshape(2 * n, seq)[..., None], -1)[..., 0]
  return (picked * batch['weights'].reshape(2 * n, seq)).sum(-1).reshape(n, 2)


def dpo_family(beta=0.1):
  c = dpo_gpt.get_config('tiny')
  c.update_from_flattened_dict({'preferences.path': 'unused', 'dpo.reference': 'unused',
                                'dpo.beta': beta})
  return dpo_lib.DPOFamily(c)


def test_bradley_terry_loss_against_its_closed_form():
  rng = np.random.default_rng(0)
  r_c, r_r = rng.normal(0, 3, 64), rng.normal(0, 3, 64)
  r_c[:2], r_r[:2] = [40.0, -40.0], [-40.0, 40.0]   # far margins stay finite and exact
  want = np.log1p(np.exp(-(r_c - r_r)))
  want[:2] = [np.exp(-80.0), 80.0]
  got = np.asarray(reward_lib.bradley_terry_loss(jnp.asarray(r_c, jnp.float32),
                                                 jnp.asarray(r_r, jnp.float32)), np.float64)
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-30)
  # The reward model reads its head at each response's last weighted position (numpy argmax
  # over reversed weights would be the code again: list the positions instead).
  batch = pair_batch()
  weights = batch['weights'].reshape(-1, batch['weights'].shape[-1])
  want_index = [max(np.flatnonzero(w)) for w in weights]
  np.testing.assert_array_equal(reward_lib.last_response_index(jnp.asarray(weights)), want_index)


def test_reward_head_starts_at_a_tie_and_reads_only_the_past():
  model = tiny_gpt(scalar_head.ScalarHeadGPT)
  tokens = jnp.asarray(pair_batch()['inputs'][:, 0])
  score = nnx.jit(lambda m, t, i: m.score(t, i))
  assert np.all(np.asarray(nnx.jit(lambda m, t: m.values(t))(model, tokens)) == 0.0)  # ties
  model.value_head.kernel[...] = jax.random.normal(jax.random.key(1), (16, 1))
  changed = tokens.at[:, 7:].set(3)
  index = jnp.full((tokens.shape[0],), 6)
  np.testing.assert_array_equal(score(model, tokens, index), score(model, changed, index))
  assert not np.allclose(score(model, tokens, index + 2), score(model, changed, index + 2))


def test_dpo_loss_is_ln2_when_the_policy_is_the_reference():
  model, batch = tiny_gpt(), pair_batch()
  family = dpo_family()
  loss, metrics = nnx.jit(lambda m, b: family.loss({'model': m, 'reference': m}, b, None,
                                                   train=False))(model, batch)
  assert float(loss) == pytest.approx(math.log(2.0), abs=1e-7)
  assert float(metrics['reward_margin']) == 0.0 and float(metrics['accuracy']) == 0.0


def test_one_dpo_step_raises_the_chosen_response_over_the_rejected():
  policy, reference, batch = tiny_gpt(), tiny_gpt(), pair_batch(seed=3)
  family = dpo_family(beta=0.5)
  before = numpy_response_log_probs(policy, batch)
  graphdef, params, rest = nnx.split(policy, nnx.Param, ...)

  def loss(params):
    return family.loss({'model': nnx.merge(graphdef, params, rest), 'reference': reference},
                       jax.tree.map(jnp.asarray, batch), None, train=False)[0]

  value_and_grad = jax.jit(jax.value_and_grad(loss))
  start, grads = value_and_grad(params)
  stepped = nnx.merge(graphdef, jax.tree.map(lambda p, g: p - 0.05 * g, params, grads), rest)
  after = numpy_response_log_probs(stepped, batch)
  # The log-ratio against the (unchanged) reference moved towards the chosen responses.
  gain = (after[:, 0] - after[:, 1]) - (before[:, 0] - before[:, 1])
  assert gain.mean() > 0 and float(value_and_grad(nnx.state(stepped, nnx.Param))[0]) < start


# --------------------------------------------------------- pair files and runs from an SFT run


def write_small_multi30k(directory, lines=(400, 40, 40)):
  """The first lines of Multi30k's train, val and test2016 files (both languages)."""
  source = os.path.join(RAW, 'multi30k')
  os.makedirs(directory)
  for name, count in zip(('train', 'val', 'test_2016_flickr'), lines):
    for language in ('en', 'de'):
      with gzip.open(os.path.join(source, f'{name}.{language}.gz'), 'rt', encoding='utf-8') as f:
        head = f.read().splitlines()[:count]
      with gzip.open(os.path.join(directory, f'{name}.{language}.gz'), 'wt',
                     encoding='utf-8') as f:
        f.write('\n'.join(head) + '\n')
  return directory


def make_sft(root):
  """A tiny en_de instruction-tuned run (its own tokenizer, 2 steps) and pairs written from it,
  under directory `root` (a pathlib.Path): (run dir, pairs dir, root). conftest.py's
  session fixture `alignment_sft` makes it once per test process (this module and
  tests/test_rlhf.py share it)."""
  raw = write_small_multi30k(str(root / 'multi30k'))
  c = gpt_instruct.get_config('tiny')
  c.update_from_flattened_dict({
      'data.tasks': ('en_de',), 'data.raw_dir': raw, 'data.vocab_size': 600,
      'data.forgetting_source': '', 'total_steps': 2, 'eval_every': 0, 'checkpoint_every': 0,
      'optimizer.decay_steps': 2, **SMALL_MODEL})
  workdir = str(root / 'sft')
  loop.train(c, workdir, devices=jax.devices()[:1])
  pairs = str(root / 'pairs')
  preferences.generate(workdir, pairs, num_prompts=40, num_held_out=8, max_new_tokens=10)
  return workdir, pairs, root


@pytest.fixture
def sft(alignment_sft):
  return alignment_sft


# Smaller than the :tiny configs' model (fewer compiled ops); the SFT run's model section.
SMALL_MODEL = {'model.num_layers': 1, 'model.embed_dim': 16}


def alignment_config(module, sft_dir, pairs_dir, **overrides):
  c = module.get_config('tiny')
  c.update_from_flattened_dict({'init_from': sft_dir, 'preferences.path': pairs_dir,
                                **SMALL_MODEL,
                                **({'dpo.reference': sft_dir} if module is dpo_gpt else {}),
                                **overrides})
  return c


@needs_multi30k
def test_pairs_are_reproducible_from_the_seed_and_judged_as_stated(sft):
  sft_dir, pairs_dir, root = sft
  again, other = str(root / 'again'), str(root / 'other')
  preferences.generate(sft_dir, again, num_prompts=40, num_held_out=8, max_new_tokens=10)
  preferences.generate(sft_dir, other, num_prompts=40, num_held_out=0, max_new_tokens=10,
                       seed=1)
  read = lambda d: open(os.path.join(d, preferences.RECORDS_FILE), encoding='utf-8').read()
  assert read(again) == read(pairs_dir)
  assert read(other) not in read(pairs_dir)   # another seed: other prompts and samples
  manifest, splits = preferences.load(pairs_dir)
  # Prompts that leave no room for the response in the context are skipped.
  assert manifest['counts'] == {s: len(splits[s]) for s in preferences.SPLITS}
  assert 36 <= len(splits['train']) <= 40 and all(6 <= len(splits[s]) <= 8
                                                  for s in ('validation', 'test'))
  tokenizer = text_lib.load_from_workdir(sft_dir)
  chrf = sacrebleu.metrics.CHRF()
  for record in splits['train'] + splits['test']:
    for text, ids, score in zip(record['responses'], record['response_ids'], record['chrf']):
      assert text == tokenizer.decode([t for t in ids if t != text_lib.EOS_ID]).strip()
      assert score == pytest.approx(chrf.sentence_score(text, [record['reference']]).score)
    diff = record['chrf'][0] - record['chrf'][1]
    assert record['p_first'] == pytest.approx(1.0 / (1.0 + math.exp(-diff / 5.0)))
  # Two samples per prompt differ (temperature 1), and the prompts are distinct examples.
  assert sum(r['response_ids'][0] != r['response_ids'][1] for r in splits['train']) >= 32
  assert len({r['index'] for r in splits['train']}) == len(splits['train'])


@needs_multi30k
def test_a_second_temperature_draws_the_second_responses_at_it(sft):
  sft_dir, _, root = sft
  out = str(root / 'pairs_second_temperature')
  # Near 0 the second responses are the greedy ones: checked against a full-recompute argmax
  # over the model's logits, one token at a time.
  preferences.generate(sft_dir, out, num_prompts=6, num_held_out=0, max_new_tokens=10,
                       second_temperature=1e-7)
  manifest, splits = preferences.load(out)
  assert manifest['temperature'] == 1.0 and manifest['second_temperature'] == 1e-7
  model = run_loader.load_models(sft_dir)[1]['model']
  for record in splits['train']:
    ids = list(record['prompt_ids'])
    for _ in range(10):
      ids.append(int(jnp.argmax(model(jnp.asarray([ids]))[0, -1])))
      if ids[-1] == text_lib.EOS_ID:
        break
    assert record['response_ids'][1] == ids[len(record['prompt_ids']):]
  # The first responses stay samples at temperature 1: they differ from the greedy ones.
  assert sum(r['response_ids'][0] != r['response_ids'][1] for r in splits['train']) >= 3
  with pytest.raises(UserError, match=r'^--second_temperature=0.0: must be > 0'):
    preferences.generate(sft_dir, str(root / 'pairs_bad'), num_prompts=6, num_held_out=0,
                         second_temperature=0.0)


@needs_multi30k
def test_reward_model_starts_at_ln2_and_reports_pairwise_accuracy(sft):
  sft_dir, pairs_dir, root = sft
  run = loop.train(alignment_config(reward_gpt, sft_dir, pairs_dir), str(root / 'reward'),
                   devices=jax.devices()[:1])
  assert run.step_losses[1] == pytest.approx(math.log(2.0), abs=1e-6)   # zero head: ties
  evals = [row for row in run.history if 'eval/accuracy' in row]
  assert evals and all(0.0 <= row['eval/accuracy'] <= 1.0 for row in evals)


@needs_multi30k
def test_min_confidence_keeps_the_clear_training_pairs_only(sft):
  sft_dir, pairs_dir, _ = sft
  _, splits = preferences.load(pairs_dir)
  gap = lambda r: abs(r['chrf'][0] - r['chrf'][1])
  # A cut halfway between two of the train split's distinct chrF gaps (no pair on the border);
  # the judge (temperature 5) is sure of a pair with probability sigmoid(gap / 5).
  gaps = sorted({gap(r) for r in splits['train']})
  cut = (gaps[len(gaps) // 2 - 1] + gaps[len(gaps) // 2]) / 2
  min_confidence = 1.0 / (1.0 + math.exp(-cut / 5.0))
  clear = [r for r in splits['train'] if gap(r) > cut]
  assert 0 < len(clear) < len(splits['train'])
  family = loop.setup(alignment_config(reward_gpt, sft_dir, pairs_dir, **{
      'preferences.min_confidence': min_confidence}), jax.devices()[:1]).family
  assert family._train.pairs.records == preferences.PairRows(clear, family.max_len).records
  # Validation keeps every pair: the same batches as without the filter.
  unfiltered = loop.setup(alignment_config(reward_gpt, sft_dir, pairs_dir),
                          jax.devices()[:1]).family
  assert len(unfiltered._train.pairs) > len(family._train.pairs)
  jax.tree.map(np.testing.assert_array_equal, family._eval, unfiltered._eval)
  for bad in (0.4, 1.0):
    fails_in_one_line(alignment_config(reward_gpt, sft_dir, pairs_dir, **{
        'preferences.min_confidence': bad}),
        rf'config.preferences.min_confidence={bad}: must be in \[0.5, 1\)')


@needs_multi30k
def test_dpo_run_starts_at_ln2_equals_on_8_devices_and_resumes_exactly(sft):
  sft_dir, pairs_dir, root = sft
  config = lambda **o: alignment_config(dpo_gpt, sft_dir, pairs_dir, eval_every=0, **o)
  one = loop.train(config(), str(root / 'dpo1'), devices=jax.devices()[:1])
  # Step 1's loss is computed before any update: the policy is the reference (both the SFT run).
  assert one.step_losses[1] == pytest.approx(math.log(2.0), abs=1e-6)
  assert one.step_losses[4] < one.step_losses[1]
  eight = loop.train(config(**{'mesh.data': 8}), str(root / 'dpo8'))
  np.testing.assert_allclose([eight.step_losses[s] for s in range(1, 5)],
                             [one.step_losses[s] for s in range(1, 5)], rtol=1e-5)
  workdir = str(root / 'dpo_resumed')
  first = loop.train(config(total_steps=2), workdir, devices=jax.devices()[:1])
  second = loop.train(config(), workdir, devices=jax.devices()[:1])
  assert sorted(second.step_losses) == [3, 4]
  for s in range(1, 5):
    assert (first.step_losses | second.step_losses)[s] == one.step_losses[s], s
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(second.state),
               jax.device_get(one.state))


def fails_in_one_line(config, match, workdir=None):
  """The config is refused with one line matching `match`: by the loop's set-up, or with
  `workdir` by `loop.train` in it, having saved no checkpoint."""
  with pytest.raises(UserError, match=match) as e:
    if workdir:
      loop.train(config, workdir, devices=jax.devices()[:1])
    else:
      loop.setup(config, jax.devices()[:1])
  assert '\n' not in str(e.value)
  if workdir:
    checkpoints = os.path.join(workdir, 'checkpoints')
    assert not os.path.isdir(checkpoints) or not os.listdir(checkpoints)  # nothing saved


def run_with_another_tokenizer(run_dir, copy_dir):
  """A copy of `run_dir` whose tokenizer is a different subword tokenizer (vocabulary 300)."""
  shutil.copytree(run_dir, copy_dir)
  os.remove(os.path.join(copy_dir, text_lib.TOKENIZER_FILE))
  text_lib.save_in_workdir(text_lib.SubwordTokenizer.train(['ein hund', 'a dog'] * 50, 300),
                           copy_dir)
  return copy_dir


@needs_multi30k
def test_bad_alignment_inputs_are_one_line(sft):
  sft_dir, pairs_dir, root = sft
  bad = str(root / 'bad')

  def fails(config, match, run_it=False):
    fails_in_one_line(config, match, bad if run_it else None)

  fails(alignment_config(dpo_gpt, sft_dir, pairs_dir, **{'dpo.beta': 0.0}),
        r'config.dpo.beta=0.0: must be > 0')
  fails(alignment_config(reward_gpt, str(root / 'none'), pairs_dir),
        r'config.init_from=.*none: no tokenizer.json there')
  fails(alignment_config(dpo_gpt, sft_dir, pairs_dir, **{'dpo.reference': str(root / 'none')}),
        r'config.dpo.reference=.*none: no checkpoint', run_it=True)
  # A run like the SFT run but with another tokenizer: as the reference, and as init_from.
  other = run_with_another_tokenizer(sft_dir, str(root / 'other_tokenizer'))
  fails(alignment_config(dpo_gpt, sft_dir, pairs_dir, **{'dpo.reference': other}),
        r'config.dpo.reference=.*other_tokenizer: its tokenizer differs')
  fails(alignment_config(reward_gpt, other, pairs_dir),
        r'config.preferences.path=.*pairs: its pairs were tokenized by .*sft:2, whose '
        r'tokenizer differs')
  # A reference whose family.json names another vocabulary: the loop's check.
  with open(os.path.join(other, 'family.json'), 'w', encoding='utf-8') as f:
    json.dump({'tokenizer': 'subword', 'vocab_size': 300}, f)
  shutil.copy(os.path.join(sft_dir, 'tokenizer.json'), os.path.join(other, 'tokenizer.json'))
  fails(alignment_config(dpo_gpt, sft_dir, pairs_dir, **{'dpo.reference': other}),
        r'config.dpo.reference=.*other_tokenizer', run_it=True)
  # A damaged pair file: one changed byte, then a malformed record with a matching checksum.
  damaged = str(root / 'damaged')
  shutil.copytree(pairs_dir, damaged)
  records = os.path.join(damaged, preferences.RECORDS_FILE)
  text = open(records, encoding='utf-8').read()
  with open(records, 'w', encoding='utf-8') as f:
    f.write(text.replace('"chosen": 1', '"chosen": 0', 1))
  fails(alignment_config(reward_gpt, sft_dir, damaged),
        r'preferences.jsonl is damaged \(its sha256 differs')
  manifest, _ = preferences.load(pairs_dir)
  lines = text.splitlines()
  lines[2] = json.dumps({**json.loads(lines[2]), 'chosen': 'first'})
  preferences.write(damaged, [json.loads(line) for line in lines],
                    {k: v for k, v in manifest.items()
                     if k not in ('format', 'counts', 'records_sha256')})
  fails(alignment_config(reward_gpt, sft_dir, damaged), r'line 3: field .chosen.')
