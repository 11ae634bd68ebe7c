r"""Fine-tuning a pretrained GPT-2 imported from Hugging Face (`python -m train.import_hf`).

The importer writes a run directory (config.json from this file, the model's own tokenizer.json,
the pretrained weights as checkpoint 0); training resumes from it on Tiny Shakespeare, with
GPT-2's tokenizer (config.data.tokenizer='pretrained'):

  python -m train.import_hf --hf_dir=HF_DIR --out=DIR
  python -m train --config=experiments/configs/gpt_pretrained.py:DIR --workdir=DIR \
      --config.total_steps=200
  python -m train.evaluate --workdir=DIR    # validation loss and perplexity

ARG is the run directory: its config.json gives the model's shape and tokenizer (so that the
checkpoint restores), and any other key it holds; `--config.KEY=VALUE` overrides as usual. Without
ARG this is the template the importer fills in.

Fine-tuning defaults (chosen, not tuned): AdamW lr 1e-4 (100 warmup steps, cosine to 1e-5 over
2000), weight decay 0.1, clip 1.0, batch 8, dropout as the checkpoint's config.json says. Each
window is model.block_size tokens (GPT-2: 1024), which is slow on a CPU.
"""

import json
import os

from ml_collections import config_dict

from experiments.configs import gpt_shakespeare


def get_config(arg: str | None = None):
  c = gpt_shakespeare.get_config()
  c.total_steps = 2000
  c.batch_size = 8
  c.eval_batches = 10
  c.sample_tokens = 128
  c.data.tokenizer = 'pretrained'
  c.data.tokenizer_file = config_dict.placeholder(str)  # the importer: DIR/tokenizer.json
  c.data.eos_token = '<|endoftext|>'
  c.model.vocab_size = 50257
  c.model.activation = 'gelu_tanh'
  c.model.init_std = 0.02
  c.optimizer.update(lr=1e-4, min_lr=1e-5, warmup_steps=100, decay_steps=2000)
  if arg is None:
    return c
  path = os.path.join(arg, 'config.json')
  if not os.path.isfile(path):
    raise ValueError(f'no {path}: give a run directory written by python -m train.import_hf')
  with open(path, encoding='utf-8') as f:
    saved = json.load(f)
  as_tuples = lambda v: tuple(as_tuples(x) for x in v) if isinstance(v, list) else v
  c.update_from_flattened_dict({k: as_tuples(v) for k, v in _flatten(saved).items()})
  return c


def _flatten(tree, prefix=''):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out
