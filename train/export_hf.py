"""`python -m train.export_hf --workdir=DIR --out=HF_DIR`: a genlab GPT run as a Hugging Face GPT-2.

Writes HF_DIR/model.safetensors and HF_DIR/config.json (a GPT2Config) that transformers'
`GPT2LMHeadModel.from_pretrained(HF_DIR)` loads, and the run's tokenizer.json when it has one
(subword or pretrained tokenizers; a character-level run has none). The weights are those
`train.sample` uses (EMA where the run keeps it) of the latest checkpoint. Every genlab GPT maps:
its exact GELU is transformers' "gelu", GPT-2's tanh approximation its "gelu_new". A LoRA
run's adapters are folded into the weights first (`models.lora.merge_lora`), so GPT-2 computes
the tuned model, not its base.
Needs `safetensors` only (numpy), not torch.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import flags
from flax import nnx

from models import lora as lora_lib
from train import cli
from train import hf_gpt2
from train import run_loader
from train import storage
from train import text as text_lib
from train.errors import UserError

def export_gpt2(workdir: str, out: str) -> str:
  """Writes HF_DIR `out` from run `workdir`; returns a one-line summary."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=import-outside-toplevel
  family, models, step = run_loader.load_models(workdir)
  if family.name != 'gpt':
    raise UserError(f'--workdir={workdir}: a {family.name!r} run; only gpt runs export to GPT-2')
  if os.path.exists(os.path.join(out, hf_gpt2.WEIGHTS_FILE)):
    raise UserError(f'--out={out}: already holds {hf_gpt2.WEIGHTS_FILE}; use a new directory')
  m = family.config.model
  if int(m.get('prompt_tokens', 0) or 0):
    raise UserError(f'--workdir={workdir}: a prompt-tuned run (config.model.prompt_tokens='
                    f'{m.prompt_tokens}); GPT-2 has no place for its learned prompt vectors')
  model = lora_lib.merge_lora(models['model'])
  settings = dict(block_size=model.block_size, num_layers=model.num_layers,
                  num_heads=model.num_heads, embed_dim=model.embed_dim,
                  vocab_size=model.vocab_size, activation=m.get('activation', 'gelu'),
                  dropout=float(m.dropout), init_std=m.get('init_std'))
  params = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
    name = jax.tree_util.keystr(path, simple=True, separator='/').removesuffix('/value')
    params[name] = np.asarray(jax.device_get(leaf), np.float32)
  tensors = hf_gpt2.to_hf(params, settings)

  kind = family.tokenizer_kind
  bos_id = eos_id = None
  if kind == 'pretrained':
    bos_id = eos_id = family.tokenizer.eos_id  # GPT-2: <|endoftext|> is both
  elif kind == 'subword':
    bos_id, eos_id = text_lib.BOS_ID, text_lib.EOS_ID
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise UserError(f'--out={out}: cannot create it ({e.strerror or e})') from None
  if kind != 'char':
    family.tokenizer.save(os.path.join(out, hf_gpt2.TOKENIZER_FILE))
  with open(os.path.join(out, hf_gpt2.CONFIG_FILE), 'w', encoding='utf-8') as f:
    json.dump(hf_gpt2.hf_config(settings, bos_id=bos_id, eos_id=eos_id), f, indent=2)
  # transformers reads files whose metadata says they hold PyTorch-layout tensors.
  safetensors_numpy.save_file(tensors, os.path.join(out, hf_gpt2.WEIGHTS_FILE),
                              metadata={'format': 'pt'})
  files = 'model.safetensors, config.json' + (', tokenizer.json' if kind != 'char' else
                                              ' (a char-level run: no tokenizer.json)')
  return f'exported step {step} of {storage.absolute(workdir)} to {out}: {files}'


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  workdir = flags.FLAGS.workdir
  if not workdir:
    raise UserError('--workdir is required (a gpt run directory)')
  # --workdir and --out are train.sample's flags (it loads the run).
  if not flags.FLAGS.out:
    raise UserError('--out is required (the directory to write)')
  print(export_gpt2(workdir, flags.FLAGS.out), flush=True)


if __name__ == '__main__':
  cli.run(main)
