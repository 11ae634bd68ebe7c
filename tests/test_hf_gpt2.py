"""Hugging Face GPT-2 <-> genlab GPT: `train.import_hf` and `train.export_hf` against transformers.

The reference is transformers' own GPT2LMHeadModel (PyTorch), randomly initialised here with
every weight, bias and LayerNorm parameter drawn at random (its own init zeroes the biases and
sets LayerNorms to 1/0, which would hide a misplaced bias), and a byte-level BPE tokenizer
trained here with the `tokenizers` library: nothing downloads.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
safetensors_numpy = pytest.importorskip('safetensors.numpy')

from flax import nnx  # pylint: disable=wrong-import-position

from experiments.configs import gpt_pretrained  # pylint: disable=wrong-import-position
from models import gpt as gpt_lib  # pylint: disable=wrong-import-position
from tests.conftest import needs_data  # pylint: disable=wrong-import-position
from train import export_hf  # pylint: disable=wrong-import-position
from train import families  # pylint: disable=wrong-import-position
from train import hf_gpt2  # pylint: disable=wrong-import-position
from train import import_hf  # pylint: disable=wrong-import-position
from train import loop  # pylint: disable=wrong-import-position
from train import run_loader
from train.errors import UserError  # pylint: disable=wrong-import-position

VOCAB, POSITIONS = 300, 64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_tokenizer(path):
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=VOCAB - 10, special_tokens=['<|endoftext|>'], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(['the quick brown fox jumps over the lazy dog, then sleeps'] * 20 +
                          ['to be or not to be, that is the question'] * 20, trainer)
  tok.save(path)
  return tok


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """A random tiny GPT-2 saved as the Hub serves one: config.json, model.safetensors,
  tokenizer.json. Returns (directory, the torch model)."""
  directory = str(tmp_path_factory.mktemp('hf') / 'gpt2')
  torch.manual_seed(0)
  config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=POSITIONS,
                                   vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
  model = transformers.GPT2LMHeadModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      # LayerNorm scales around 1, everything else N(0, 0.3): logits of order 1-10.
      scale = 0.3 if 'ln_' not in name or name.endswith('bias') else 0.2
      p.copy_(torch.randn_like(p) * scale + (1.0 if 'ln_' in name and 'weight' in name else 0))
  model.save_pretrained(directory)
  _write_tokenizer(os.path.join(directory, 'tokenizer.json'))
  return directory, model


@pytest.fixture(scope='module')
def imported(hf_dir, tmp_path_factory):
  """The import of `hf_dir` with dropout 0: (run directory, family, genlab GPT)."""
  run = str(tmp_path_factory.mktemp('runs') / 'imported')
  import_hf.import_gpt2(hf_dir[0], run, dropout=0.0)
  family, models, step = run_loader.load_models(run)
  assert step == 0
  return run, family, models['model']


def _params(model):
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  return {jax.tree_util.keystr(p, simple=True, separator='/'): np.asarray(x) for p, x in flat}


def test_imported_logits_equal_transformers(hf_dir, imported):
  _, hf = hf_dir
  _, _, model = imported
  ids = np.random.default_rng(0).integers(0, VOCAB, (2, POSITIONS))
  with torch.no_grad():
    want = hf(torch.tensor(ids)).logits.numpy()
  got = np.asarray(model(jnp.asarray(ids, jnp.int32)))
  assert np.abs(want).max() > 1.0  # the comparison is not of near-zero numbers
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

  # The activation matters at this scale: genlab's exact GELU would not match GPT-2.
  exact = gpt_lib.GPT(vocab_size=VOCAB, block_size=POSITIONS, num_layers=2, num_heads=2,
                      embed_dim=32, activation='gelu', rngs=nnx.Rngs(0))
  nnx.update(exact, nnx.state(model, nnx.Param))
  assert np.abs(np.asarray(exact(jnp.asarray(ids, jnp.int32))) - want).max() > 1e-3


def test_kv_cached_decoding_equals_transformers_cache(hf_dir, imported):
  _, hf = hf_dir
  _, _, model = imported
  ids = np.random.default_rng(1).integers(0, VOCAB, (2, 12))
  prompt, rest = ids[:, :8], ids[:, 8:]
  with torch.no_grad():
    cache = transformers.DynamicCache(config=hf.config)  # filled in place
    want = [hf(torch.tensor(prompt), cache=cache, use_cache=True).logits[:, -1].numpy()]
    for i in range(rest.shape[1]):
      out = hf(torch.tensor(rest[:, i:i + 1]), cache=cache, use_cache=True)
      want.append(out.logits[:, -1].numpy())
    assert cache.get_seq_length() == ids.shape[1]
  logits, cache = model.prefill(jnp.asarray(prompt, jnp.int32), model.init_cache(2))
  got = [np.asarray(logits[:, -1])]
  for i in range(rest.shape[1]):
    logits, cache = model.decode(jnp.asarray(rest[:, i], jnp.int32), 8 + i, cache)
    got.append(np.asarray(logits))
  np.testing.assert_allclose(np.stack(got), np.stack(want), atol=1e-4, rtol=0)


def test_export_round_trip_is_exact(hf_dir, imported, tmp_path):
  directory, hf = hf_dir
  run, _, model = imported
  out = str(tmp_path / 'exported')
  export_hf.export_gpt2(run, out)
  loaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  original = hf.state_dict()
  again = loaded.state_dict()
  assert set(again) == set(original)
  for name, tensor in original.items():
    assert torch.equal(again[name], tensor), name  # bit for bit
  # The same tokenizer (genlab writes the library's compact JSON, the test file is indented).
  read_json = lambda d: json.load(open(os.path.join(d, 'tokenizer.json'), encoding='utf-8'))
  assert read_json(out) == read_json(directory)
  assert loaded.config.eos_token_id == 0 and loaded.config.activation_function == 'gelu_new'

  # import(export(x)) == x, every param bit for bit.
  reimported = str(tmp_path / 'reimported')
  import_hf.import_gpt2(out, reimported, dropout=0.0)
  _, models, _ = run_loader.load_models(reimported)
  first, second = _params(model), _params(models['model'])
  assert set(first) == set(second)
  for name, x in first.items():
    np.testing.assert_array_equal(second[name], x, err_msg=name)


@needs_data
def test_a_lora_run_exports_its_adapters(tmp_path):
  """A LoRA run (adapters on every Linear and on the tied token table) exports as the tuned
  model: transformers' logits are those of the genlab run with its adapters."""
  from experiments.configs import gpt_shakespeare  # pylint: disable=import-outside-toplevel

  def config(**overrides):
    c = gpt_shakespeare.get_config('tiny')
    c.update_from_flattened_dict({'total_steps': 2, 'log_every': 1, 'eval_every': 0,
                                  'checkpoint_every': 0, 'sample_tokens': 4, **overrides})
    return c

  one = jax.devices()[:1]
  loop.train(config(), str(tmp_path / 'base'), devices=one)
  run = str(tmp_path / 'lora')
  loop.train(config(**{'init_from': str(tmp_path / 'base'), 'lora.rank': 2, 'lora.embed_rank': 1,
                       'lora.targets': r'(attn/(qkv|proj)|mlp/(fc|proj)|wte)$',
                       'trainable': 'lora', 'optimizer.lr': 0.05,
                       'optimizer.warmup_steps': 0}), run, devices=one)
  family, models, _ = run_loader.load_models(run)
  _, base_models, _ = run_loader.load_models(str(tmp_path / 'base'))
  out = str(tmp_path / 'hf')
  export_hf.export_gpt2(run, out)
  hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  ids = np.random.default_rng(3).integers(0, family.tokenizer.vocab_size, (2, 32))
  with torch.no_grad():
    want = hf(torch.tensor(ids)).logits.numpy()
  tuned = np.asarray(models['model'](jnp.asarray(ids, jnp.int32)))
  base = np.asarray(base_models['model'](jnp.asarray(ids, jnp.int32)))
  assert np.abs(tuned - base).max() > 1e-2  # the adapters trained: the base would not do
  np.testing.assert_allclose(want, tuned, atol=1e-4, rtol=0)
  # A prompt-tuned run cannot be written as GPT-2: refused, not exported without its prompt.
  prompt = str(tmp_path / 'prompt')
  loop.train(config(**{'init_from': str(tmp_path / 'base'), 'model.prompt_tokens': 2,
                       'trainable': 'prompt', 'total_steps': 1}), prompt, devices=one)
  with pytest.raises(UserError, match=r'a prompt-tuned run \(config.model.prompt_tokens=2\)'):
    export_hf.export_gpt2(prompt, str(tmp_path / 'hf_prompt'))
  assert not os.path.exists(str(tmp_path / 'hf_prompt'))


def test_a_genlab_gpt_with_exact_gelu_exports(tmp_path):
  """genlab's own GPT (exact GELU, its init) as GPT-2 files: transformers' logits are genlab's."""
  model = gpt_lib.GPT(vocab_size=70, block_size=16, num_layers=2, num_heads=4, embed_dim=32,
                      init_std=0.3, rngs=nnx.Rngs(1))
  settings = dict(block_size=16, num_layers=2, num_heads=4, embed_dim=32, vocab_size=70,
                  activation='gelu', dropout=0.0, init_std=0.3)
  params = {k.removesuffix('/value'): v for k, v in _params(model).items()}
  out = str(tmp_path / 'hf')
  os.makedirs(out)
  safetensors_numpy.save_file(hf_gpt2.to_hf(params, settings),
                              os.path.join(out, 'model.safetensors'), metadata={'format': 'pt'})
  with open(os.path.join(out, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(hf_gpt2.hf_config(settings, bos_id=None, eos_id=None), f)
  hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  ids = np.random.default_rng(2).integers(0, 70, (2, 16))
  with torch.no_grad():
    want = hf(torch.tensor(ids)).logits.numpy()
  assert hf.config.activation_function == 'gelu' and np.abs(want).max() > 1.0
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids, jnp.int32))), want, atol=1e-4,
                             rtol=0)


def test_greedy_sampling_equals_transformers_generate(hf_dir, imported):
  _, hf = hf_dir
  run, family, model = imported
  prompt = 'the quick'
  text = family.sample({'model': model}, jax.random.key(0), run,
                       {'num_samples': 1, 'prompt': prompt, 'max_new_tokens': 6,
                        'temperature': 0.0, 'top_k': None, 'top_p': None})
  # genlab prompts start after the end-of-text token, as GPT-2 documents do.
  ids = [family.tokenizer.eos_id] + list(family.tokenizer.encode(prompt))
  with torch.no_grad():
    # An explicit mask: the first token is the eos (= pad) id, which generate would mask.
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                      max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
  want = out[0, len(ids):].numpy()
  got = gpt_lib.generate(model, jnp.asarray([ids], jnp.int32), jax.random.key(0),
                         max_new_tokens=6, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(got)[0], want)
  assert text == prompt + family.tokenizer.decode(want, skip_special=False)


@needs_data
def test_training_resumes_from_the_imported_weights(hf_dir, tmp_path):
  """The first step's loss, computed by the loop from checkpoint 0 on its own Tiny Shakespeare
  batch, is transformers' loss of that batch: the run trains the pretrained weights."""
  directory, hf = hf_dir
  run = str(tmp_path / 'run')
  import_hf.import_gpt2(directory, run, dropout=0.0)
  config = gpt_pretrained.get_config(run)
  config.update_from_flattened_dict({'total_steps': 2, 'batch_size': 2, 'log_every': 1,
                                     'eval_every': 0, 'checkpoint_every': 0,
                                     'sample_tokens': 4, 'optimizer.warmup_steps': 1})
  result = loop.train(config, run, devices=jax.devices()[:1])
  family = families.get('gpt')(config)
  family.setup_data(0, 1)
  batch = family.train_batch(0)
  with torch.no_grad():
    logits = hf(torch.tensor(batch['inputs'])).logits
    want = torch.nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), torch.tensor(batch['targets']).reshape(-1).long()).item()
  assert abs(result.step_losses[1] - want) < 1e-4
  assert result.step_losses[2] != result.step_losses[1]
  assert int(result.state['step']) == 2


@needs_data
def test_evaluate_reports_transformers_validation_loss(hf_dir, imported, tmp_path):
  _, hf = hf_dir
  run, family, model = imported
  report_path = str(tmp_path / 'report.json')
  summary = family.evaluate({'model': model}, run, 0, {'report': report_path})
  with open(report_path, encoding='utf-8') as f:
    report = json.load(f)
  losses = []
  with torch.no_grad():
    for batch in family.eval_batches():
      logits = hf(torch.tensor(batch['inputs'])).logits
      losses.append(torch.nn.functional.cross_entropy(
          logits.reshape(-1, VOCAB), torch.tensor(batch['targets']).reshape(-1).long()).item())
  assert abs(report['loss'] - np.mean(losses)) < 1e-4
  assert report['perplexity'] == pytest.approx(np.exp(report['loss']))
  assert report['dataset'] == 'tiny_shakespeare' and 'perplexity' in summary


def _broken_copy(hf_dir, tmp_path, drop=None, **config_changes):
  broken = str(tmp_path / 'broken')
  shutil.copytree(hf_dir, broken)
  if drop:
    os.remove(os.path.join(broken, drop))
  if config_changes:
    path = os.path.join(broken, 'config.json')
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
    config.update(config_changes)
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(config, f)
  return broken


@pytest.mark.parametrize('drop, changes, culprit', [
    ('tokenizer.json', {}, 'no tokenizer.json'),
    ('model.safetensors', {}, 'no model.safetensors'),
    (None, {'model_type': 'llama'}, "model_type 'llama'"),
    (None, {'scale_attn_by_inverse_layer_idx': True}, 'scale_attn_by_inverse_layer_idx=True'),
    (None, {'activation_function': 'relu'}, "activation_function='relu'"),
    (None, {'n_layer': 3}, 'lacks tensor h.2.'),
])
def test_bad_checkpoints_are_named(hf_dir, tmp_path, drop, changes, culprit):
  broken = _broken_copy(hf_dir[0], tmp_path, drop, **changes)
  with pytest.raises(UserError, match=culprit.replace('.', r'\.').replace('(', r'\(')):
    import_hf.import_gpt2(broken, str(tmp_path / 'out'))
  assert not os.path.exists(tmp_path / 'out' / 'checkpoints')


def test_cli_prints_one_line(hf_dir, tmp_path):
  broken = _broken_copy(hf_dir[0], tmp_path, model_type='bert')
  proc = subprocess.run(
      [sys.executable, '-m', 'train.import_hf', f'--hf_dir={broken}',
       f'--out={tmp_path / "out"}'], cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "model_type 'bert'" in lines[0] and 'config.json' in lines[0]
