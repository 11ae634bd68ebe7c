"""The translation family: label smoothing, packed batches, 8 devices vs 1, exact resume, the
command line (train, sample, evaluate) and its bad input.

GENLAB_RAW_DATA: the folder holding multi30k/ (CI: ../shared/data); skipped without it.
"""

import json
import os
import subprocess
import sys
from collections import Counter

import jax
import numpy as np
import optax
import pytest
import sacrebleu
from absl import flags

from experiments.configs import translate_multi30k
from tests import toy_families
from tests.test_sharding import three_steps
from train import config as config_lib
from train import evaluate as evaluate_lib
from train import loop
from train import sample as sample_lib
from train import text
from train.errors import UserError
from train.families import translate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'experiments/configs/translate_multi30k.py')
needs_multi30k = pytest.mark.skipif(
    not os.path.isfile(os.path.join(os.environ.get('GENLAB_RAW_DATA', '/nonexistent'),
                                    'multi30k', 'train.en.gz')),
    reason='GENLAB_RAW_DATA is unset or lacks multi30k/')


def test_smoothed_loss_matches_optax():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 17)).astype(np.float32) * 3
  labels = rng.integers(0, 17, size=(3, 5))
  for s in (0.0, 0.1, 0.3):
    loss, nll = translate.smoothed_cross_entropy(logits, labels, s)
    ref = optax.softmax_cross_entropy(
        logits, optax.smooth_labels(jax.nn.one_hot(labels, 17), s))
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(nll, optax.softmax_cross_entropy_with_integer_labels(
        logits, labels), rtol=1e-5)


def _pairs(n, seed=0):
  rng = np.random.default_rng(seed)
  src = [rng.integers(6, 50, size=rng.integers(1, 20)) for _ in range(n)]
  tgt = [rng.integers(6, 50, size=rng.integers(1, 24)) for _ in range(n)]
  return src, tgt


def _unpack(batch):
  """(source ids, target ids) of every segment of every row, read back from the arrays."""
  out = []
  for r in range(len(batch['src'])):
    for seg in range(1, batch['src_seg'][r].max() + 1):
      s = batch['src'][r][batch['src_seg'][r] == seg]
      t_in = batch['tgt_in'][r][batch['tgt_seg'][r] == seg]
      t_out = batch['tgt_out'][r][batch['tgt_seg'][r] == seg]
      assert s[-1] == text.EOS_ID and t_in[0] == text.BOS_ID and t_out[-1] == text.EOS_ID
      np.testing.assert_array_equal(t_in[1:], t_out[:-1])  # teacher forcing: shifted by one
      np.testing.assert_array_equal(batch['src_pos'][r][batch['src_seg'][r] == seg],
                                    np.arange(len(s)))
      out.append((tuple(s[:-1]), tuple(t_out[:-1])))
  return out


def test_packed_pairs_cover_an_epoch_and_are_step_pure():
  src, tgt = _pairs(300)
  make = lambda **kw: text.PackedPairs(src, tgt, src_len=32, tgt_len=32, batch_rows=8, seed=3,
                                       **kw)
  data = make()
  steps = data.steps_per_epoch(0)
  seen = [p for s in range(steps) for p in _unpack(data.batch(s))]
  everything = Counter((tuple(s), tuple(t)) for s, t in zip(src, tgt))
  assert not Counter(seen) - everything  # only real pairs, none twice
  left_out = sum(everything.values()) - len(seen)  # the rows that did not fill a last batch
  assert 0 <= left_out < 8 * 32 // 2
  assert (data.batch(0)['src_seg'] > 0).mean() > 0.8  # packed, not padded
  # Pure in the step: a fresh object, steps asked in another order, gives the same batches.
  fresh = make()
  for s in (steps + 5, 2, steps):
    for k, v in fresh.batch(s).items():
      np.testing.assert_array_equal(v, data.batch(s)[k], err_msg=k)
  assert fresh.locate(steps + 5)[0] == 1  # the next epoch, reshuffled
  assert _unpack(data.batch(steps)) != _unpack(data.batch(0))
  # Two processes' shares make the global batch.
  halves = [make(process_index=i, process_count=2).batch(7) for i in range(2)]
  for k, v in data.batch(7).items():
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), v)


def tiny_config(**overrides):
  c = translate_multi30k.get_config('tiny')
  c.update_from_flattened_dict({
      'total_steps': 3, 'log_every': 1, 'eval_every': 0, 'checkpoint_every': 0,
      'data.max_train_pairs': 2000, 'model.dropout': 0.0,
      'optimizer.name': 'sgd', 'optimizer.momentum': 0.9, 'optimizer.schedule': 'constant',
      'optimizer.lr': 0.5, 'optimizer.warmup_steps': 0, 'optimizer.grad_clip': 0.0,
      **overrides})
  return c


@needs_multi30k
def test_eight_devices_equal_one():
  ref_losses, init, ref_state = three_steps(tiny_config(), jax.devices()[:1])
  ref_params = jax.device_get(ref_state['params'])
  assert ref_losses[2] < ref_losses[0] - 0.05  # it learns
  for mesh in ({'mesh.data': 4, 'mesh.fsdp': 2},
               {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}):  # + Megatron TP
    losses, _, state = three_steps(tiny_config(**mesh), init_state=init)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6, err_msg=str(mesh))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(state['params']), ref_params)


@needs_multi30k
def test_resume_equals_uninterrupted(tmp_path):
  over = {'optimizer.name': 'adamw', 'optimizer.schedule': 'cosine', 'optimizer.lr': 3e-3,
          'optimizer.warmup_steps': 2, 'optimizer.decay_steps': 6, 'model.dropout': 0.1}
  full = loop.train(tiny_config(total_steps=6, **over), str(tmp_path / 'full'))
  first = loop.train(tiny_config(total_steps=3, **over), str(tmp_path / 'resumed'))
  second = loop.train(tiny_config(total_steps=6, **over), str(tmp_path / 'resumed'))
  assert sorted(second.step_losses) == [4, 5, 6]
  assert first.step_losses | second.step_losses == full.step_losses
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(second.state),
               jax.device_get(full.state))


def run(*args):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600, check=False)


def fails_here(main, argv, fragment):
  """`main` of `python -m train.sample|train.evaluate ARGV`, run in this process, raises a
  one-line UserError holding `fragment` (which the command prints as one line, exit 1)."""
  with pytest.raises(UserError) as e:
    try:
      main(flags.FLAGS(argv))
    finally:
      flags.FLAGS.unparse_flags()
  assert fragment in str(e.value) and '\n' not in str(e.value), str(e.value)


@needs_multi30k
def test_command_line_train_sample_evaluate_and_bad_input(tmp_path):
  # `train.sample` and `train.evaluate` run as commands once each; training and the bad inputs
  # run what the commands run, in this process.
  workdir = str(tmp_path / 'run')
  config = config_lib.apply_overrides(config_lib.load(f'{CONFIG}:tiny'), [
      ('total_steps', '4'), ('data.max_train_pairs', '2000')])
  loop.train(config, workdir, devices=jax.devices()[:1])
  out = run('train.sample', f'--workdir={workdir}', '--prompt=A man in an orange hat is smiling.',
            '--beam_size=2', '--length_penalty=0.6')
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines()[0].startswith('# translate samples from step 4')
  sample_fails = lambda fragment, *a: fails_here(sample_lib.main,
                                                 ['sample', f'--workdir={workdir}', *a], fragment)
  sample_fails('--beam_size=0', '--beam_size=0')
  sample_fails('exceed the model', '--prompt=' + 'word ' * 100)
  sample_fails("--top_k: not a sampling flag of family 'translate'", '--top_k=3')
  # Evaluation: the report's BLEU is sacreBLEU's on the translations it wrote.
  ev = run('train.evaluate', f'--workdir={workdir}', '--split=test2017_mscoco',
           '--beam_size=1', '--num_samples=40', f'--report={tmp_path}/r.json')
  assert ev.returncode == 0, ev.stderr
  with open(tmp_path / 'r.json', encoding='utf-8') as f:
    report = json.load(f)
  with open(tmp_path / 'r.txt', encoding='utf-8') as f:
    hyp = f.read().splitlines()
  refs = text.load_multi30k(None, 'test2017_mscoco', 'de')[:40]
  assert report['num_sentences'] == len(hyp) == 40
  assert report['bleu'] == pytest.approx(sacrebleu.corpus_bleu(hyp, [refs]).score)
  assert report['bleu_signature'].startswith('nrefs:1|case:mixed')
  evaluate_fails = lambda fragment, *a: fails_here(
      evaluate_lib.main, ['evaluate', f'--workdir={workdir}', *a], fragment)
  evaluate_fails('--split=test2099', '--split=test2099')
  evaluate_fails("--classifier: not an evaluation flag of family 'translate'", '--classifier=x')
  # A damaged, then a missing tokenizer file: one line naming it; checkpoints untouched.
  tok = os.path.join(workdir, 'tokenizer.json')
  with open(tok, 'w', encoding='utf-8') as f:
    f.write('{"model": {')
  sample_fails('damaged tokenizer file')
  os.remove(tok)
  sample_fails('tokenizer file missing')
  assert os.listdir(os.path.join(workdir, 'checkpoints'))


def test_translation_flags_on_another_family_are_refused():
  family = toy_families.ToyRegression(toy_families.regression_config())
  try:
    flags.FLAGS(['sample', '--beam_size=4'])
    with pytest.raises(UserError, match="--beam_size: not a sampling flag of family "
                                        "'toy_regression'"):
      sample_lib.family_options(family)
  finally:
    flags.FLAGS.unparse_flags()
