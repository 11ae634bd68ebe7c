r"""VAE vs GAN vs DDPM on MNIST: one evaluation protocol, one Markdown table, one sample picture.

  python -m experiments.compare_image_generators --classifier=workdirs/classifier_mnist \
      --vae_workdir=DIR --gan_workdir=DIR --ddpm_workdir=DIR [--out_dir=DIR] [--num_samples=10000]

Each workdir that has no checkpoint is first trained with its config (--vae_config,
--gan_config, --ddpm_config: `path.py[:ARG]`, optionally followed by `--config.KEY=VALUE`
overrides, e.g. 'experiments/configs/ddpm_mnist.py:cond --config.total_steps=2400'; by default
the experiments' quality configs); a model whose
workdir flag is empty is left out. Every model is scored by `train.evaluate.evaluate` with the
same classifier features, the same number of samples, seed and sampling batch: Frechet
distance, precision/recall, the share of samples classified with confidence > 0.9, classes
covered, and the family's likelihood where one is defined (VAE: IWAE test NLL in nats; DDPM:
variational bound in bits/dim) on --likelihood_examples test images. Training time is the sum of
the logged step times (metrics.jsonl: evaluation, checkpoints and compilation excluded).

Writes to --out_dir: comparison.md (the table), samples.png (the first 64 samples of each model, side
by side) and one JSON report per model.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
from absl import flags
from PIL import Image, ImageDraw, ImageFont

from train import checkpoint as ckpt_lib
from train import cli
from train import config as config_lib
from train import evaluate as evaluate_lib
from train import images as images_lib
from train import loop
from train import run_loader
from train import sample  # noqa: F401 (defines the sampling flags this command reads)
from train import storage
from train.errors import UserError

MODELS = ('vae', 'gan', 'ddpm')
_WORKDIRS = {m: flags.DEFINE_string(f'{m}_workdir', None, f'{m.upper()} run directory (trained '
                                    f'with --{m}_config if it has no checkpoint; empty: skip).')
             for m in MODELS}
_CONFIGS = {
    'vae': flags.DEFINE_string('vae_config', 'experiments/configs/vae_mnist.py:iwae', 'VAE config.'),
    'gan': flags.DEFINE_string('gan_config', 'experiments/configs/gan_mnist.py', 'GAN config.'),
    'ddpm': flags.DEFINE_string('ddpm_config', 'experiments/configs/ddpm_mnist.py', 'DDPM config.'),
}
flags.DEFINE_string('out_dir', 'workdirs/compare_image_generators', 'Output directory.')
# Shared with train.evaluate / train.sample (defined there): --classifier, --batch, --seed,
# --num_samples (default here 10,000), --likelihood_examples (default here the whole test
# split), and for the DDPM only --sampler, --steps, --eta, --guidance.
flags.FLAGS.set_default('likelihood_examples', 10_000)
_LIKELIHOOD_OF = flags.DEFINE_list('likelihood_of', ['vae', 'ddpm'],
                                   'Models whose likelihood metrics are computed.')
_DDPM_FLAGS = ('sampler', 'steps', 'eta', 'guidance')

# The likelihood each family reports, as (report key, table text).
_NLL_KEYS = (('iwae_nll_nats', '{:.2f} nats (IWAE, k={iwae_samples})'),
             ('vlb_bits_per_dim', '{:.3f} +- {vlb_bits_per_dim_stderr:.3f} bits/dim (VLB, all T '
                                  'terms, {vlb_images} images)'))


def train_if_needed(name: str, workdir: str, spec: str) -> None:
  checkpoints = ckpt_lib.Checkpointer(storage.join(workdir, 'checkpoints'), async_save=False)
  has_checkpoint = checkpoints.latest_step() is not None
  checkpoints.close()
  if not has_checkpoint:
    print(f'{name}: no checkpoint in {workdir}; training {spec}', flush=True)
    loop.train(load_config(spec), workdir)


def load_config(spec: str):
  """'path.py[:ARG] [--config.KEY=VALUE ...]' -> the config, overrides applied."""
  path, *rest = spec.split()
  rest, overrides = config_lib.split_overrides(rest)
  if rest:
    raise UserError(f'config {spec!r}: {" ".join(rest)} is not a --config.KEY=VALUE override')
  return config_lib.apply_overrides(config_lib.load(path), overrides)


def train_seconds(workdir: str) -> float:
  """Sum of logged step times: each metrics.jsonl row's mean step time x the steps it covers."""
  total, last = 0.0, None
  lines = storage.read_text(storage.join(workdir, 'metrics.jsonl')).splitlines()
  for row in map(json.loads, lines):
    if 'step_time_ms' in row:
      if last is not None and row['step'] > last:
        total += row['step_time_ms'] / 1e3 * (row['step'] - last)
      last = row['step']
    elif 'compile_time_s' in row:
      last = row['step']
  return total


def duration(seconds: float) -> str:
  return f'{seconds:.0f} s' if seconds < 120 else f'{seconds / 60:.1f} min'


def rate(per_s: float) -> str:
  return f'{per_s:,.0f}' if per_s >= 100 else f'{per_s:.1f}'


def likelihood_text(likelihood: dict[str, Any]) -> str:
  for key, fmt in _NLL_KEYS:
    if key in likelihood:
      return fmt.format(likelihood[key], **likelihood)
  return 'n/a'


def table(rows: list[dict[str, Any]]) -> str:
  head = ('| model | params | train steps x batch | train time | Frechet dist. | precision | '
          'recall | confident > 0.9 | classes | NLL | sampling images/s |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for r in rows:
    rep, cov = r['report'], r['report'].get('coverage', {})
    lines.append(
        f'| {r["name"]} | {sum(rep["num_params"].values()):,} | {r["steps"]:,} x {r["batch"]} | '
        f'{duration(r["train_s"])} | {rep["frechet_distance"]:.2f} | {rep["precision"]:.3f} | '
        f'{rep["recall"]:.3f} | {cov.get("confident_share", float("nan")):.3f} | '
        f'{cov.get("classes_covered", "-")}/10 | {likelihood_text(rep["likelihood"])} | '
        f'{rate(rep["sampling"]["images_per_s"])} |')
  ref = rows[0]['report']['reference_train_vs_test']
  lines.append(f'| real train images | | | | {ref["frechet_distance"]:.2f} | '
               f'{ref["precision"]:.3f} | {ref["recall"]:.3f} | | | | |')
  return '\n'.join(lines)


def side_by_side(grids: list[tuple[str, np.ndarray]], path: str) -> None:
  """One 8x8 sample grid per model, captioned, left to right."""
  pictures = [(name, images_lib.image_grid(images[:64], ncols=8)) for name, images in grids]
  caption, gap = 16, 12
  width = sum(p.width for _, p in pictures) + gap * (len(pictures) - 1)
  height = max(p.height for _, p in pictures) + caption
  out = Image.new('RGB', (width, height), 'white')
  draw, font, x = ImageDraw.Draw(out), ImageFont.load_default(), 0
  for name, picture in pictures:
    draw.text((x + 2, 2), name, fill=(0, 0, 0), font=font)
    out.paste(picture, (x, caption))
    x += picture.width + gap
  out.save(path)


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  chosen = [m for m in MODELS if _WORKDIRS[m].value]
  if not chosen:
    raise UserError('give at least one of --vae_workdir, --gan_workdir, --ddpm_workdir')
  fl = flags.FLAGS
  extractor = evaluate_lib.ClassifierFeatures(fl.classifier)
  os.makedirs(fl.out_dir, exist_ok=True)
  rows, grids = [], []
  for name in chosen:
    workdir = _WORKDIRS[name].value
    train_if_needed(name, workdir, _CONFIGS[name].value)
    loaded = run_loader.load_models(workdir)
    config = loaded[0].config
    options = {f: fl[f].value for f in _DDPM_FLAGS} if name == 'ddpm' else {}
    # train.evaluate's progress lines (sampling, features, likelihood) follow this one.
    print(f'{name}: evaluating {workdir} (step {loaded[2]})', flush=True)
    t0 = time.perf_counter()
    report, images, _ = evaluate_lib.evaluate(
        workdir, extractor, num_samples=fl.num_samples or 10_000, batch=fl.batch, seed=fl.seed,
        likelihood_examples=fl.likelihood_examples if name in _LIKELIHOOD_OF.value else 0,
        options=options, loaded=loaded)
    report['evaluation_s'] = time.perf_counter() - t0
    with open(os.path.join(fl.out_dir, f'{name}.json'), 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=1)
    print(evaluate_lib.summary(report), flush=True)
    label = name.upper() + (' (class-conditional)' if loaded[0].conditional else '')
    rows.append({'name': label, 'report': report, 'steps': loaded[2],
                 'batch': config.batch_size, 'train_s': train_seconds(workdir)})
    grids.append((label, images))
  markdown = table(rows)
  with open(os.path.join(fl.out_dir, 'comparison.md'), 'w', encoding='utf-8') as f:
    f.write(markdown + '\n')
  side_by_side(grids, os.path.join(fl.out_dir, 'samples.png'))
  print(markdown)
  print(f'wrote {fl.out_dir}/comparison.md and samples.png')


if __name__ == '__main__':
  cli.run(main)
