"""`python -m train.sample --workdir=DIR [--seed=S] [family flags]`.

Loads DIR's latest checkpoint (EMA weights when the run kept them) and samples with the family's
own flags; giving a flag the family does not take is an error. The same seed gives the same
output.
  language models: --num_samples --prompt --max_new_tokens --temperature (0: greedy) --top_k --top_p
  translation:     --prompt (a source sentence) --beam_size (1: greedy) --length_penalty
  RAG generator:   --prompt (a question) --retriever (dense | bm25 | none) --top_k (passages)
  image families:  --num_samples --labels (all | 3 | 1,7) --out (PNG path; default
                   DIR/samples/sample.png), and for diffusion --sampler --steps --eta --guidance
                   --group_norm_sums, for the GAN --truncation --best_of
  text2image:      --prompt (captions separated by ';') --num_samples (per prompt) --out
                   --sampler --steps --eta --guidance --group_norm_sums
"""

from __future__ import annotations

import json

import jax
from absl import flags

from train import checkpoint as ckpt_lib
from train import cli
from train import config as config_lib
from train import run_loader
from train import storage
from train.errors import UserError

_WORKDIR = flags.DEFINE_string('workdir', None, 'A run directory written by `python -m train`.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
# Family flags: None means "not given" (the family's default applies).
flags.DEFINE_integer('num_samples', None, 'How many samples.')
flags.DEFINE_string('prompt', None, 'Text to continue (language models; default a newline); '
                    'text2image: captions to draw, several separated by ";".')
flags.DEFINE_integer('max_new_tokens', None, 'Tokens to generate (default 500).')
flags.DEFINE_float('temperature', None, 'Softmax temperature; 0 is greedy (default 1).')
flags.DEFINE_integer('top_k', None, 'Language models: keep only the k most likely tokens; '
                     'BERT: the k best fillers; RAG generator: the passages to read.')
flags.DEFINE_float('top_p', None, 'Nucleus sampling: keep the smallest set of tokens '
                   'whose probability reaches p, in (0, 1].')
flags.DEFINE_string('labels', None, 'Class-conditional images: "all", one id, or ids "1,7".')
flags.DEFINE_string('out', None, 'Image families: PNG path of the sample grid.')
flags.DEFINE_string('sampler', None, 'Diffusion: reverse sampler name (e.g. ddpm, ddim).')
flags.DEFINE_integer('steps', None, 'Diffusion: number of reverse steps.')
flags.DEFINE_float('eta', None, 'Diffusion (DDIM): noise scale in [0, 1]; 0 is deterministic.')
flags.DEFINE_float('guidance', None, 'Diffusion: classifier-free guidance scale w.')
flags.DEFINE_string('group_norm_sums', None, "Diffusion, text2image: how the UNet's GroupNorms "
                    'sum over positions while sampling: reduce (flax\'s GroupNorm) or dot '
                    '(batched dots, faster on XLA:CPU; the same params, equal up to float '
                    'rounding); default the run\'s config.model.group_norm_sums.')
flags.DEFINE_float('truncation', None, 'GAN: the truncation trick (Brock et al. 2019): latents '
                   'drawn from N(0, I) truncated to [-t, t] per coordinate (default: none).')
flags.DEFINE_integer('best_of', None, 'GAN: each image is the one of this many generator '
                     'samples that the discriminator scores highest (default 1: no selection).')
flags.DEFINE_integer('beam_size', None, 'Translation: beam width (1: greedy search).')
flags.DEFINE_float('length_penalty', None, 'Translation: GNMT length penalty alpha >= 0 of beam '
                   'search (0: raw log probability).')
flags.DEFINE_string('retriever', None, 'RAG generator: dense, bm25 or none (closed book); '
                    'default the run\'s.')

FAMILY_FLAGS = ('num_samples', 'prompt', 'max_new_tokens', 'temperature', 'top_k', 'top_p',
                'labels', 'out', 'sampler', 'steps', 'eta', 'guidance', 'group_norm_sums',
                'truncation', 'best_of', 'beam_size', 'length_penalty', 'retriever')


def family_options(family) -> dict:
  """The family's flags (None when not given); UserError for a given flag it does not take."""
  given = [name for name in FAMILY_FLAGS if flags.FLAGS[name].present]
  for name in given:
    if name not in family.sample_flags:
      raise UserError(f'--{name}: not a sampling flag of family {family.name!r} '
                      f'(it takes: {", ".join("--" + f for f in family.sample_flags) or "none"})')
  return {name: flags.FLAGS[name].value for name in family.sample_flags}


def workdir_and_out(argv) -> tuple[str, str]:
  """--workdir and --out of a command that reads one run and writes another (train.export,
  train.quantize); UserError when either is missing or an argument is left over."""
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  workdir, out = flags.FLAGS.workdir, flags.FLAGS.out
  if not workdir:
    raise UserError('--workdir is required')
  if not out:
    raise UserError('--out is required (the run directory to write)')
  return workdir, out


def write_run(out: str, config, family, state, step: int, meta: dict) -> None:
  """Writes run directory `out` (made now): config.json, family.json, the family's run files
  and one checkpoint of `state` at `step` (meta: data_step, family and `meta`)."""
  try:
    storage.makedirs(out)
  except OSError as e:
    raise UserError(f'--out={out}: cannot create it ({getattr(e, "strerror", None) or e})'
                    ) from None
  storage.write_text(storage.join(out, 'config.json'), config_lib.to_json(config))
  storage.write_text(storage.join(out, 'family.json'), json.dumps(family.metadata()))
  family.write_run_files(out)
  checkpointer = ckpt_lib.Checkpointer(storage.join(out, 'checkpoints'), async_save=False)
  checkpointer.save(step, state, {'data_step': step, 'family': family.name, **meta})
  checkpointer.close()


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _WORKDIR.value:
    raise UserError('--workdir is required')
  family, models, step = run_loader.load_models(_WORKDIR.value)
  options = family_options(family)
  print(f'# {family.name} samples from step {step} of {_WORKDIR.value}', flush=True)
  out = family.sample(models, jax.random.key(_SEED.value), _WORKDIR.value, options)
  print(out, flush=True)


if __name__ == '__main__':
  cli.run(main)
