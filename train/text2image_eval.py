"""`python -m train.evaluate --workdir=DIR --prompts=test`: a text-to-image run against captions.

Generates one image for each of the first --num_samples (default 500) captions of the split's
seen attribute combinations and as many of its unseen (held-out, train/captions.py `HELDOUT`)
ones, from DIR's latest checkpoint (EMA weights) with the sampling flags of `train.sample`
(--sampler --steps --eta --guidance --group_norm_sums), and reports for each group:

  attribute_accuracy   share of (image, attribute) pairs where `captions.measure` of the
                       generated image gives the caption's category; per attribute, and
                       `all_attributes` (every attribute of the image right); `chance` beside
                       it (one category drawn uniformly per attribute)
  label_accuracy       share of images the --classifier run classifies as the caption's digit
  frechet_distance     between classifier features of the generated images and of the whole
                       test split (as train/evaluate.py), with `reference`: the same for the
                       real images the captions describe (the floor at this sample size)
  clip_score           with --clip=RUN (a `clip`-family run): its mean caption-image score of
                       the generated images, beside that of the real images

The report is written as JSON to --report (default DIR/eval/prompts-SPLIT_nN[_options]
_stepS.json) with a PNG grid of the first captions and their images beside it (or at --out).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from absl import flags

from train import captions
from train import image_metrics
from train import images as images_lib
from train import run_loader
from train import storage
from train.errors import UserError

#: The `train.evaluate` flags of a text2image run.
EVALUATE_FLAGS = ('num_samples', 'sampler', 'steps', 'eta', 'guidance', 'group_norm_sums',
                  'out', 'prompts', 'classifier', 'clip', 'batch', 'report')
DEFAULT_NUM_SAMPLES = 500


def prompt_split(family, split: str) -> dict[str, np.ndarray]:
  """The captioned `split` (captions.caption_arrays, the run's seed and max_len); UserError
  naming --prompts when the dataset has no such split."""
  c = family.config
  try:
    return captions.caption_arrays(c.data.name, split, data_dir=c.data.data_dir,
                                   raw_dir=c.data.raw_dir, seed=c.seed, max_len=family.max_len)
  except ValueError as e:
    raise UserError(f'--prompts={split}: {e}') from None


def attribute_scores(images: np.ndarray, wanted: dict[str, np.ndarray], dataset: str
                     ) -> dict[str, Any]:
  """Measured categories of uint8 `images` [N, H, W, C] against `wanted` (attribute -> [N]
  category indices): per-attribute accuracy, their mean, all attributes right, and chance."""
  got = captions.measure(images, dataset)
  right = {name: got[name] == np.asarray(wanted[name]) for name in wanted}
  return {'attribute_accuracy': float(np.mean([r.mean() for r in right.values()])),
          'per_attribute': {name: float(r.mean()) for name, r in right.items()},
          'all_attributes': float(np.logical_and.reduce(list(right.values())).mean()),
          'chance': float(np.mean([1.0 / len(captions.ATTRIBUTES[n]) for n in wanted]))}


def _clip_scorer(run: str | None, dataset: str):
  """(uint8 images [N, H, W, C], N caption strings) -> [N] cosine caption-image scores of a
  `clip` run (train/families/clip.py), or None without --clip."""
  if not run:
    return None
  family, models, _ = run_loader.load_run_of('clip', run, '--clip')
  if family.config.data.name != dataset:
    raise UserError(f'--clip={run}: trained on {family.config.data.name!r}, but this run '
                    f'models {dataset!r}')
  from train.families import clip as clip_family   # pylint: disable=import-outside-toplevel
  tokenizer, max_len = captions.CaptionTokenizer(), int(family.config.model.max_len)
  return lambda images, texts: np.asarray(clip_family.clip_score(
      models, images, tokenizer.encode(list(texts), max_len)))


def evaluate_prompts(family, models, workdir: str, step: int, options: dict[str, Any]) -> str:
  """`train.evaluate` of a text2image run (options: its EVALUATE_FLAGS, None = not given)."""
  from train import evaluate as evaluate_lib   # pylint: disable=import-outside-toplevel
  split = options.get('prompts') or 'test'
  num = DEFAULT_NUM_SAMPLES if options.get('num_samples') is None else options['num_samples']
  batch = options.get('batch') or 500
  if num < 2 or batch < 1:
    raise UserError(f'--num_samples={num} (>= 2 per group), --batch={batch} (>= 1): one is out '
                    'of range')
  sampling = family.check_sample_options(
      {k: options.get(k) for k in ('sampler', 'steps', 'eta', 'guidance', 'group_norm_sums')
       if options.get(k) is not None})
  data = prompt_split(family, split)
  dataset = family.config.data.name
  extractor = None
  if options.get('classifier'):
    extractor = evaluate_lib.ClassifierFeatures(options['classifier'])
    extractor.check(family.image_shape, dataset, f'--workdir={workdir}')
  clip = _clip_scorer(options.get('clip'), dataset)
  real = None
  if extractor is not None:
    test_feats, _ = extractor(prompt_split(family, 'test')['image'] if split != 'test'
                              else data['image'], batch, 'features of the test split')
    real = image_metrics.feature_statistics(test_feats)

  names = captions.DATASET_ATTRIBUTES[dataset]
  # --seed (train.sample's flag) when the command defines it; read unparsed in-process too.
  key = jax.random.key(flags.FLAGS['seed'].value if 'seed' in flags.FLAGS else 0)
  report = {'workdir': storage.absolute(workdir), 'family': family.name,
            'checkpoint_step': step, 'dataset': dataset, 'prompts': split,
            'sampling_options': sampling, 'num_params': evaluate_lib.num_params(models),
            'classifier': None if extractor is None else extractor.describe(),
            'clip': options.get('clip'), 'groups': {}}
  grid_rows = []
  for g, (group, rows) in enumerate((('seen', np.flatnonzero(~data['heldout'])),
                                     ('unseen', np.flatnonzero(data['heldout'])))):
    rows = rows[:num]
    if not len(rows):
      continue
    tokens = data['tokens'][rows]
    images, times = images_lib.generate_in_batches(
        family, models, jax.random.fold_in(key, g), len(rows), tokens, sampling, batch,
        what=f'sampling {group} captions')
    out = {'num_captions': len(rows),
           'images_per_s': sum(n for n, _ in times[1:] or times) / sum(
               t for _, t in times[1:] or times),
           **attribute_scores(images, {n: data[n][rows] for n in names}, dataset)}
    if extractor is not None:
      feats, probs = extractor(images, batch, f'features of the {group} images')
      out['label_accuracy'] = float((probs.argmax(-1) == data['label'][rows]).mean())
      out['frechet_distance'] = image_metrics.frechet_distance(
          *image_metrics.feature_statistics(feats), *real)
      real_feats, real_probs = extractor(data['image'][rows], batch, f'the {group} real images')
      out['reference'] = {
          'label_accuracy': float((real_probs.argmax(-1) == data['label'][rows]).mean()),
          'frechet_distance': image_metrics.frechet_distance(
              *image_metrics.feature_statistics(real_feats), *real)}
    if clip is not None:
      texts = data['caption'][rows]
      out['clip_score'] = float(clip(images, texts).mean())
      out.setdefault('reference', {})['clip_score'] = float(
          clip(data['image'][rows], texts).mean())
    report['groups'][group] = out
    grid_rows += [(str(data['caption'][r]), images[i]) for i, r in enumerate(rows[:8])]

  opts = ''.join(f'_{k}-{v}' for k, v in sorted(sampling.items()))
  path = options.get('report') or storage.join(
      workdir, 'eval', f'prompts-{split}_n{num}{opts}_step{step}.json')
  storage.write_text(path, json.dumps(report, indent=1))
  grid = options.get('out') or os.path.splitext(path)[0] + '.png'
  if not grid.endswith('.png'):
    grid += '.png'
  storage.save_image(grid, images_lib.prompt_grid(
      [c for c, _ in grid_rows], np.stack([im for _, im in grid_rows])[:, None]))
  return f'{summary(report)}\nwrote {path} and {grid}'


def summary(report: dict[str, Any]) -> str:
  lines = [f'{report["family"]} step {report["checkpoint_step"]}: captions of the '
           f'{report["prompts"]} split, {report["sampling_options"]}']
  for group, g in report['groups'].items():
    per = ', '.join(f'{k} {v:.3f}' for k, v in g['per_attribute'].items())
    line = (f'  {group} ({g["num_captions"]} captions): attribute accuracy '
            f'{g["attribute_accuracy"]:.3f} ({per}; all {g["all_attributes"]:.3f}; chance '
            f'{g["chance"]:.3f})')
    ref = g.get('reference', {})
    if 'label_accuracy' in g:
      line += (f', label accuracy {g["label_accuracy"]:.3f} (real {ref["label_accuracy"]:.3f})'
               f', frechet_distance {g["frechet_distance"]:.2f} (real '
               f'{ref["frechet_distance"]:.2f})')
    if 'clip_score' in g:
      line += f', clip_score {g["clip_score"]:.3f} (real {ref["clip_score"]:.3f})'
    lines.append(line)
  return '\n'.join(lines)
