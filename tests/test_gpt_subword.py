"""The GPT family with the subword tokenizer on Multi30k: trains, keeps its tokenizer in the run
directory, samples from it without the dataset."""

import os

import jax
import pytest

from experiments.configs import gpt_multi30k
from train import loop
from train import run_loader
from train import text

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(os.environ.get('GENLAB_RAW_DATA', '/nonexistent'),
                                    'multi30k', 'train.en.gz')),
    reason='GENLAB_RAW_DATA is unset or lacks multi30k/train.en.gz')


def test_gpt_trains_and_samples_with_the_subword_tokenizer(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  config = gpt_multi30k.get_config('tiny')
  config.update_from_flattened_dict({'eval_every': 20, 'checkpoint_every': 20})
  result = loop.train(config, workdir)
  evals = [h for h in result.history if 'eval/perplexity' in h]
  vocab = config.data.vocab_size
  # Uniform guessing over the vocabulary scores `vocab`; 20 steps learn the frequent tokens.
  assert evals and evals[-1]['eval/perplexity'] < 0.8 * vocab
  assert 'eval/bits_per_token' in evals[-1]
  assert os.path.isfile(os.path.join(workdir, text.TOKENIZER_FILE))

  # Sampling needs no dataset: only the run directory.
  monkeypatch.delenv('GENLAB_RAW_DATA')
  family, models, step = run_loader.load_models(workdir)
  assert step == 20 and family.tokenizer.vocab_size == vocab
  out = family.sample(models, jax.random.key(0), workdir,
                      {'num_samples': 2, 'prompt': 'A man in', 'max_new_tokens': 8,
                       'temperature': None, 'top_k': None, 'top_p': None})
  samples = out.split('\n\n-----\n')
  assert len(samples) == 2 and all(s.startswith('A man in') for s in samples)
