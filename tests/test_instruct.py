"""Instruction tuning: the tasks' data, the response-only loss, and tuned runs from a base GPT
(full, LoRA and prompt tuning) that train, score and keep their frozen params."""

import gzip
import os
import types

import jax
import ml_collections
import numpy as np
import optax
import pytest

from experiments.configs import gpt_base
from experiments.configs import gpt_instruct
from train import instruct
from train import loop
from train import run_loader
from train import text as text_lib
from train.errors import UserError
from train.families import gpt as gpt_family
from train.families import gpt_instruct as family_lib

RAW = os.environ.get('GENLAB_RAW_DATA', '')
needs_data = pytest.mark.skipif(
    not (os.path.isfile(os.path.join(RAW, 'multi30k', 'train.en.gz'))
         and os.environ.get('TFDS_DATA_DIR')),
    reason='GENLAB_RAW_DATA (Multi30k) and TFDS_DATA_DIR (Tiny Shakespeare) are needed')


@pytest.fixture(scope='module')
def tokenizer():
  sentences = ['a man rides a red bike', 'two dogs play in the snow', 'ein mann fährt rad',
               'Instruction: Input: Response:'] * 20
  return text_lib.SubwordTokenizer.train(sentences, 300)


# ------------------------------------------------------------------------------------ data


@needs_data
def test_parallel_source_pairs_each_sentence_with_its_translation():
  def lines(name):
    with gzip.open(os.path.join(RAW, 'multi30k', name), 'rt', encoding='utf-8') as f:
      return f.read().splitlines()

  data = ml_collections.ConfigDict({'raw_dir': RAW})
  docs = gpt_family.source_documents('multi30k:de-en', data)
  en, de = lines('val.en.gz'), lines('val.de.gz')
  assert docs['validation'] == [f'{g}\n{e}' for g, e in zip(de, en)] and len(de) > 1000
  assert len(docs['train']) == len(lines('train.en.gz'))
  config = gpt_base.get_config('parallel')
  assert config.data.sources == ('multi30k:en-de', 'multi30k:de-en', 'tiny_shakespeare')
  assert config.model == gpt_base.get_config().model  # the same model, another corpus
  long = gpt_base.get_config('parallel_long')   # the same run, 4x the steps (decay included)
  assert long.total_steps == long.optimizer.decay_steps == 4 * config.total_steps
  long.total_steps = long.optimizer.decay_steps = config.total_steps
  assert long.to_dict() == config.to_dict()
  with pytest.raises(UserError, match="language 'fr'"):
    gpt_family.source_documents('multi30k:en-fr', data)


def test_template_must_hold_every_slot_and_end_with_the_response():
  assert instruct.check_template('{instruction} {input} => {response}')
  for bad, culprit in [('{instruction} {input}', '{response}'),
                       ('{instruction} {response} {input}', 'end with'),
                       ('{input} {response}', '{instruction}'),
                       ('{instruction} {input} {other} {response}', 'only')]:
    with pytest.raises(UserError, match=culprit) as e:
      instruct.check_template(bad)
    assert '\n' not in str(e.value)
  with pytest.raises(UserError, match='unknown'):
    instruct.check_tasks(['en_de', 'poetry'])


def test_rows_weight_exactly_the_response_and_its_eos(tokenizer):
  examples = [instruct.Example('reverse', 'a red bike', 'bike red a'),
              instruct.Example('count', 'two dogs play', '3')]
  template = '{instruction} {input} => {response}'
  task = instruct.EncodedTask(examples, tokenizer, template, text_lib.EOS_ID, max_len=96)
  assert len(task) == 2 and task.dropped == 0
  batch = instruct.rows([task], [(0, 0), (0, 1)], 96)
  for row, example in enumerate(examples):
    weights = batch['weights'][row].astype(bool)
    # Independently of the row builder: the weighted targets spell the response, then [EOS].
    answer = batch['targets'][row][weights]
    assert answer[-1] == text_lib.EOS_ID
    assert tokenizer.decode(answer[:-1]) == example.response
    # The inputs are [EOS] and the rendered prompt, then the response (teacher forcing).
    n_in = int(np.sum(batch['inputs'][row] != text_lib.PAD_ID))
    text = tokenizer.decode(batch['inputs'][row][:n_in], skip_special=False)
    prompt = f'{instruct.INSTRUCTIONS[example.task]} {example.input} => '
    assert text == '[EOS]' + prompt + example.response
    assert not weights[:len(tokenizer.encode(prompt))].any()


def test_space_starts_response_tokenizes_the_first_word_as_in_running_text(tokenizer):
  """With config.data.space_starts_response the response's first word is the token it is in the
  input (a byte-level BPE word carries its leading space); by default the prompt ends in a lone
  space token and the word is spelt otherwise. The rows spell the same text either way."""
  example = instruct.Example('reverse', 'a red bike', 'bike red a')
  template = instruct.DEFAULT_TEMPLATE
  assert template.endswith(': {response}')
  # Independent reference: the tokens of the input line, whose last word is 'bike' after a space.
  line = tokenizer.encode('Input: a red bike')
  bike = list(tokenizer.encode(' bike'))
  assert list(line[-len(bike):]) == bike
  filled = template.format(instruction=instruct.INSTRUCTIONS['reverse'], input='a red bike',
                           response='bike red a')
  first = {}
  for space in (False, True):
    task = instruct.EncodedTask([example], tokenizer, template, text_lib.EOS_ID, 96,
                                space_starts_response=space)
    first[space] = list(task.responses[0][:len(bike)])
    assert tokenizer.decode(task.prompts[0][-1:]) == (':' if space else ' ')
    batch = instruct.rows([task], [(0, 0)], 96)
    n_in = int(np.sum(batch['inputs'][0] != text_lib.PAD_ID))
    assert tokenizer.decode(batch['inputs'][0][:n_in], skip_special=False) == (
        '[EOS]' + filled)
    answer = batch['targets'][0][batch['weights'][0].astype(bool)]
    assert tokenizer.decode(answer[:-1]) == (' ' if space else '') + example.response
  assert first[True] == bike and first[False] != bike


def test_masked_prompt_gets_no_gradient(tokenizer):
  """The loss's gradient with respect to the logits at prompt (and padding) positions is
  exactly zero; at response positions it is not."""
  task = instruct.EncodedTask([instruct.Example('sort', 'two dogs play', 'dogs play two')],
                              tokenizer, instruct.DEFAULT_TEMPLATE, text_lib.EOS_ID, 96)
  assert len(task) == 1
  batch = instruct.rows([task], [(0, 0)], 96)
  logits = jax.random.normal(jax.random.key(0), (1, 96, tokenizer.vocab_size))

  def loss(logits):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
    return family_lib.masked_mean(ce, batch['weights'])

  grad = np.asarray(jax.grad(loss)(logits))[0]
  weights = batch['weights'][0].astype(bool)
  assert np.all(grad[~weights] == 0.0)
  assert np.all(np.abs(grad[weights]).sum(-1) > 0)


def test_synthetic_tasks_and_held_out_split():
  words = [f'w{i:03d}' for i in range(50)]
  train = {t: instruct._synthetic(t, words, 300, seed=0)
           for t in ('reverse', 'sort', 'count')}
  for t, examples in train.items():
    for e in examples[:50]:
      split = e.input.split()
      assert 3 <= len(split) <= 7 and len(set(split)) == len(split)
      expected = {'reverse': ' '.join(split[::-1]), 'sort': ' '.join(sorted(split)),
                  'count': str(len(split))}[t]
      assert e.response == expected
  seen = frozenset(e.input for e in train['sort'])
  held = instruct._synthetic('sort', words, 100, seed=1, exclude=seen)
  assert not seen & {e.input for e in held}
  assert [e.input for e in instruct._synthetic('sort', words, 20, seed=0)] == [
      e.input for e in train['sort'][:20]]


def test_batches_are_a_pure_function_of_the_step_and_split_over_processes(tokenizer):
  """Training batches per step, and the fixed eval batches: each process's slices make up
  the global batch."""
  tasks = [instruct.EncodedTask(instruct._synthetic(t, ['ab', 'cd', 'ef', 'gh', 'ij', 'kl',
                                                         'mn', 'op'], 30, seed=0),
                                tokenizer, instruct.DEFAULT_TEMPLATE, text_lib.EOS_ID, 96)
           for t in ('reverse', 'count')]
  assert all(len(t) == 30 for t in tasks)
  whole = instruct.InstructionBatches(tasks, max_len=96, global_batch_size=8, seed=3)
  halves = [instruct.InstructionBatches(tasks, max_len=96, global_batch_size=8, seed=3,
                                        process_index=i, process_count=2) for i in range(2)]
  for step in (0, 5):
    b = whole.batch(step)
    np.testing.assert_array_equal(b['inputs'], whole.batch(step)['inputs'])
    parts = [h.batch(step) for h in halves]
    for key in b:
      np.testing.assert_array_equal(b[key], np.concatenate([p[key] for p in parts]))
  assert np.any(whole.batch(0)['inputs'] != whole.batch(1)['inputs'])
  evals = [instruct.fixed_batches(tasks, 96, 8, 3, i, 2) for i in range(2)]
  for b, *parts in zip(instruct.fixed_batches(tasks, 96, 8, 3), *evals):
    for key in b:
      np.testing.assert_array_equal(b[key], np.concatenate([p[key] for p in parts]))


# -------------------------------------------------------------------------- tuned runs


@pytest.fixture(scope='module')
def base_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('base'))
  c = gpt_base.get_config('tiny')
  c.total_steps = c.optimizer.decay_steps = 4
  c.eval_every = c.checkpoint_every = 4
  loop.train(c, workdir)
  return workdir


def _instruct(method, base, **overrides):
  c = gpt_instruct.get_config(f'{method},tiny')
  c.init_from = base
  c.data.tasks = ('count', 'reverse')
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _params(workdir):
  _, models, _ = run_loader.load_models(workdir)
  return {jax.tree_util.keystr(p, simple=True, separator='/').removesuffix('/value'):
          np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(
              jax.device_get(jax.tree.map(lambda v: v, models['model'])))[0]}


@needs_data
@pytest.mark.parametrize('method, trained', [('prompt20', r'^prompt$'),
                                             ('lora4', r'lora_[ab]$'),
                                             ('lora4mt', r'lora_[ab]$')])
def test_tuned_run_trains_only_its_params_and_scores(base_run, tmp_path, method, trained):
  import re  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / method)
  loop.train(_instruct(method, base_run), workdir)
  before, after = _params(base_run), _params(workdir)
  new = sorted(set(after) - set(before))
  assert new and all(re.search(trained, p) for p in new), new
  for path, value in before.items():
    np.testing.assert_array_equal(after[path], value, err_msg=path)  # frozen: bit-identical
  if method == 'lora4mt':  # the MLP's projections and a number per token of the table too
    vocab, width = before['wte/embedding'].shape
    assert after['wte/lora/lora_a'].shape == (vocab, 1)
    assert after['wte/lora/lora_b'].shape == (1, width)
    assert after['blocks/0/mlp/fc/lora/lora_a'].shape == (width, 4)
  # The tuned model's scores: the report names every task and the forgetting loss.
  family, models, step = run_loader.load_models(workdir)
  summary = family.evaluate(models, workdir, step, {'report': None})
  assert 'count: exact_match' in summary and 'reverse: exact_match' in summary
  assert 'tiny_shakespeare validation LM loss' in summary


@needs_data
def test_full_fine_tuning_learns_the_count_task(base_run, tmp_path):
  """20 steps on one synthetic task: the response-only loss falls well below its start."""
  workdir = str(tmp_path / 'full')
  c = _instruct('full', base_run, total_steps=20)
  c.data.tasks = ('count',)
  c.optimizer.update(lr=1e-2, decay_steps=20)
  c.eval_every = 20
  losses = [v for _, v in sorted(loop.train(c, workdir).step_losses.items())]
  assert len(losses) == 20
  assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


@needs_data
def test_bad_instruction_configs_are_one_line(base_run):
  with pytest.raises(UserError, match='max_len') as e:
    loop.setup(_instruct('full', base_run, **{'data.max_len': 9}))
  assert '\n' not in str(e.value)
  with pytest.raises(UserError, match='prompt_tokens >= 1'):
    loop.setup(_instruct('full', base_run, trainable='prompt'))
  c = _instruct('full', base_run)
  c.data.template = '{instruction} {input}'
  with pytest.raises(UserError, match='response'):
    loop.setup(c)
  c = _instruct('full', base_run)   # as a hand-edited config.json could say it
  with c.unlocked():
    del c.data['space_starts_response']
    c.data.space_starts_response = 'yes'
  with pytest.raises(UserError, match='space_starts_response') as e:
    loop.setup(c)
  assert '\n' not in str(e.value)


@needs_data
def test_scoring_prompts_are_the_training_prompts(base_run, monkeypatch):
  """The greedy responses that score a run start from the very tokens its training rows put
  before the response, with space_starts_response on or off."""
  captured = []

  def fake_continue(model, padded, lengths, max_new_tokens):
    del model
    captured.extend(row[:n].tolist() for row, n in zip(np.asarray(padded), lengths))
    return np.full((len(padded), padded.shape[1] + max_new_tokens), text_lib.EOS_ID)

  monkeypatch.setattr(family_lib.gpt_lib, 'greedy_continue', fake_continue)
  last = {}
  for space in (False, True):
    family = loop.setup(_instruct('full', base_run,
                                  **{'data.space_starts_response': space})).family
    examples = family._examples()['test']['reverse'][:4]
    # The rows' prompts: the tokens before the first weighted target.
    batch = instruct.rows(family._encode({'count': [], 'reverse': examples}),
                          [(1, i) for i in range(4)], family.max_len)
    rows = [batch['inputs'][i][:int(np.argmax(batch['weights'][i])) + 1].tolist()
            for i in range(4)]
    captured.clear()
    family.respond(types.SimpleNamespace(context_size=family.max_len + 8), examples)
    assert captured == rows
    last[space] = family.tokenizer.decode(rows[0][-1:])
  assert last == {False: ' ', True: ':'}


@pytest.mark.skipif(not os.environ.get('TFDS_DATA_DIR'), reason='TFDS_DATA_DIR is not set')
def test_prompt_tuning_on_language_model_data(tmp_path):
  """The GPT family cuts windows that leave room for the soft prompt, and trains it alone."""
  from experiments.configs import gpt_shakespeare  # pylint: disable=import-outside-toplevel
  c = gpt_shakespeare.get_config('tiny')
  c.total_steps = c.optimizer.decay_steps = 4
  c.model.prompt_tokens = 5
  c.trainable = 'prompt'
  setup = loop.setup(c)
  assert setup.family.train_batch(0)['inputs'].shape == (c.batch_size, c.model.block_size - 5)
  losses = loop.train(c, str(tmp_path)).step_losses
  assert len(losses) == 4 and all(np.isfinite(v) for v in losses.values())


def test_arg_wide_takes_the_model_of_the_wide_base():
  """gpt_instruct.py's ARG word `wide` fine-tunes gpt_base.py:parallel_wide's model shape."""
  wide_base = gpt_base.get_config('parallel_wide').model
  tuned = gpt_instruct.get_config('lora8,wide').model
  assert {k: tuned[k] for k in wide_base} == wide_base.to_dict()
  assert gpt_instruct.get_config('lora8').model.embed_dim != wide_base.embed_dim
  with pytest.raises(ValueError, match='tiny or wide'):
    gpt_instruct.get_config('lora8,tiny,wide')
  assert gpt_instruct.get_config('lora8,wide,space').data.space_starts_response
  assert not gpt_instruct.get_config('lora8,wide').data.space_starts_response


def test_compare_adaptation_mixes_take_a_task_alone(tmp_path):
  """--mixes takes single, multi or any task's name (that task alone); a name that is none
  of these is refused in one line before anything trains (the base included)."""
  import json  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  names = ['single', 'multi', 'en_de', 'de_en', 'reverse', 'sort', 'count']
  # In a process of its own: the module defines absl flags (--out_dir) that another
  # experiments module imported into this test process defines too.
  read = subprocess.run(
      [sys.executable, '-c', 'import json, sys; from experiments import compare_adaptation as c; '
       'print(json.dumps([c.mix_tasks(n) for n in sys.argv[1:]]))', *names],
      cwd=root, capture_output=True, text=True, timeout=600, check=True)
  mixes = dict(zip(names, json.loads(read.stdout.strip().splitlines()[-1])))
  assert mixes.pop('single') == ['en_de']
  assert mixes.pop('multi') == ['en_de', 'de_en', 'reverse', 'sort', 'count']
  assert all(tasks == [task] for task, tasks in mixes.items()), mixes
  out = tmp_path / 'compare'
  done = subprocess.run(
      [sys.executable, '-m', 'experiments.compare_adaptation', '--tiny', '--mixes=single,sorted',
       f'--out_dir={out}'], cwd=root, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode != 0
  error = done.stderr.strip().splitlines()[-1]
  assert "'sorted'" in error and 'sort' in error and 'Traceback' not in done.stderr, error
  assert not out.exists()


def test_compare_adaptation_table_names_methods_and_mixes_as_experiments_readme_does():
  """The command's Markdown rows read as experiments/README's tables: methods by adapter and
  rank, mixes by their tasks, the trained share as '0', '100%' or two decimals."""
  import json  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  tasks = {'en_de': 19.04, 'de_en': 0.0, 'reverse': 96.2, 'sort': 0.04, 'count': 99.0}
  row = lambda method, mix, trained, **kw: {
      'method': method, 'mix': mix, 'trained': trained, 'trained_pct': 100.0 * trained / 4000,
      'opt_bytes': 2 * 4 * trained, 'ckpt_bytes': 3 * 2**20, 'tasks': tasks,
      'forgetting_loss': 4.5, **kw}
  report = {'base_params': 4000, 'rows': [
      row('base (zero-shot)', '-', 0, forgetting_loss=4.25),
      row('full', 'single', 4000, step_ms=174.4), row('lora4', 'multi', 31, step_ms=135.6),
      row('dora8', 'sort', 40, step_ms=1.0), row('lora4mt', 'reverse', 55, step_ms=2.0),
      row('prompt20', 'multi', 20, step_ms=3.0)]}
  # In a process of its own, as above (the module's absl flags).
  done = subprocess.run(
      [sys.executable, '-c', 'import json, sys; from experiments import compare_adaptation as c; '
       'print(c.markdown(json.loads(sys.argv[1])))', json.dumps(report)],
      cwd=root, capture_output=True, text=True, timeout=600, check=True)
  lines = done.stdout.strip().splitlines()
  assert lines[0].endswith('| count EM % | Shakespeare LM loss (change) |')
  assert lines[2:] == [
      '| base (zero-shot) | - | 0 | 0 | 3.00 MiB | - | 19.0 | 0.0 | 96.2 | 0.0 | 99.0 | 4.250 |',
      '| full | en_de | 4,000 (100%) | 0.03 MiB | 3.00 MiB | 174 | 19.0 | 0.0 | 96.2 | 0.0 | 99.0 | 4.500 (+0.250) |',
      '| LoRA r=4 | all five | 31 (0.78%) | 0.00 MiB | 3.00 MiB | 136 | 19.0 | 0.0 | 96.2 | 0.0 | 99.0 | 4.500 (+0.250) |',
      '| DoRA r=8 | sort | 40 (1.00%) | 0.00 MiB | 3.00 MiB | 1 | 19.0 | 0.0 | 96.2 | 0.0 | 99.0 | 4.500 (+0.250) |',
      '| lora4mt | reverse | 55 (1.38%) | 0.00 MiB | 3.00 MiB | 2 | 19.0 | 0.0 | 96.2 | 0.0 | 99.0 | 4.500 (+0.250) |',
      '| prompt (20 vectors) | all five | 20 (0.50%) | 0.00 MiB | 3.00 MiB | 3 | 19.0 | 0.0 | 96.2 | 0.0 | 99.0 | 4.500 (+0.250) |',
  ]


@needs_data
def test_compare_adaptation_fine_tunes_a_base_of_another_width(tmp_path):
  """compare_adaptation takes the model section from the base run's config.json: a base wider
  than gpt_base.py's default (as ARG parallel_wide is) fine-tunes with the command as it is."""
  import json  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  base = str(tmp_path / 'base')
  c = gpt_base.get_config('tiny')
  width, layers = 48, c.model.num_layers
  assert gpt_instruct.get_config('lora4,tiny').model.embed_dim != width
  c.model.update(embed_dim=width, num_heads=3)
  c.total_steps = c.optimizer.decay_steps = 2
  c.eval_every = c.checkpoint_every = 2
  loop.train(c, base)
  out = tmp_path / 'compare'
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(
      [sys.executable, '-m', 'experiments.compare_adaptation', '--tiny', f'--base={base}',
       '--methods=lora4', '--mixes=single', '--tune_steps=2', f'--out_dir={out}'],
      cwd=root, capture_output=True, text=True, timeout=600, check=False,
      env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'})
  assert done.returncode == 0, done.stderr[-2000:]
  report = json.loads((out / 'adaptation.json').read_text(encoding='utf-8'))
  assert [(r['method'], r['mix']) for r in report['rows']] == [('base (zero-shot)', '-'),
                                                                ('lora4', 'single')]
  # Rank 4 on each layer's qkv [w, 3w] and proj [w, w]: r (w + 3w) + r (w + w) per layer.
  assert report['rows'][1]['trained'] == layers * 4 * (4 * width + 2 * width)
  assert _params(str(out / 'single_lora4'))['wte/embedding'].shape[1] == width
  # A finished run of the other prompt format is not reused as if it were of this one.
  again = subprocess.run(
      [sys.executable, '-m', 'experiments.compare_adaptation', '--tiny', f'--base={base}',
       '--methods=lora4', '--mixes=single', '--tune_steps=2', f'--out_dir={out}',
       '--space_starts_response'],
      cwd=root, capture_output=True, text=True, timeout=600, check=False,
      env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'})
  assert again.returncode != 0
  error = again.stderr.strip().splitlines()[-1]
  assert 'single_lora4' in error and 'space_starts_response=False' in error, error
  assert (out / 'single_lora4' / 'checkpoints' / '2').is_dir()
