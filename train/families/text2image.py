"""The text-to-image family: caption-conditioned diffusion on MNIST or Fashion-MNIST.

The diffusion family (train/families/diffusion.py: schedules, loss, EMA, bound, DDPM and DDIM
samplers, classifier-free guidance) with a caption in place of the class label: the model is
models/text2image.py's UNet, which cross-attends to a jointly trained transformer encoder's
reading of the caption. Captions come from train/captions.py: the label plus attributes
measured from the pixels, with the held-out attribute combinations left out of training. In
training a caption becomes the null caption (`captions.null_tokens`) with probability
`config.diffusion.caption_dropout`, which trains the unconditional model that guidance on the
text needs.

`python -m train.sample --workdir=W --prompt="a thick, slanted seven" --guidance=3
--num_samples=16 --out=x.png`; `python -m train.evaluate --workdir=W --prompts=test` scores
generated images against held-out test captions (train/text2image_eval.py).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from flax import nnx

from models import text2image as t2i_lib
from train import captions
from train import data as data_lib
from train import images as images_lib
from train import storage
from train.errors import UserError
from train.families.diffusion import DiffusionFamily


class TextToImageFamily(DiffusionFamily):
  """DiffusionFamily's config, plus: config.text (the caption encoder): max_len (tokens per
  caption), num_layers, num_heads, embed_dim, dropout (its masks as config.model.dropout_bits
  says, like the UNet's); config.model.context_heads (heads of the UNet's cross-attention);
  config.diffusion.caption_dropout (p of the null caption in training) in place of
  label_dropout. config.data.name: mnist or fashion_mnist."""

  name = 'text2image'
  sample_flags = ('num_samples', 'prompt', 'out', 'sampler', 'steps', 'eta', 'guidance',
                  'group_norm_sums')
  condition_dropout_key = 'caption_dropout'

  def __init__(self, config):
    if not config.get('conditional', False):
      raise UserError('config.conditional=False: a text2image model is conditioned on captions')
    captions.check_text_config(config, 'text')
    super().__init__(config)
    self.tokenizer = captions.CaptionTokenizer()

  @property
  def max_len(self) -> int:
    return int(self.config.text.max_len)

  # ---- data: captioned splits; the condition is a caption's tokens ----
  def setup_data(self, process_index: int, process_count: int) -> None:
    c = self.config
    read = lambda split: captions.caption_arrays(
        c.data.name, split, data_dir=c.data.data_dir, raw_dir=c.data.raw_dir, seed=c.seed,
        max_len=self.max_len)
    train, test = read('train'), read('test')   # train: held-out combinations left out
    self.image_shape = tuple(train['image'].shape[1:])
    self.class_names = [str(i) for i in range(int(train['label'].max()) + 1)]
    self._images = {'train': train['image'], 'test': test['image']}
    self._tokens = {'train': train['tokens'], 'test': test['tokens']}
    # The batchers pick example indices; the images and tokens are looked up by them.
    self._train = data_lib.ImageBatches(
        train['image'], np.arange(len(train['image'])), global_batch_size=c.batch_size,
        seed=c.seed, process_index=process_index, process_count=process_count)
    seen = np.flatnonzero(~test['heldout'])   # the eval loss on seen combinations
    self._eval = [self._examples('test', b['label']) for b in data_lib.fixed_batches(
        test['image'][seen], seen, global_batch_size=c.batch_size,
        num_batches=c.get('eval_batches', 10), process_index=process_index,
        process_count=process_count)]

  def _examples(self, split: str, index: np.ndarray) -> dict[str, np.ndarray]:
    return {'image': self._images[split][index], 'tokens': self._tokens[split][index]}

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    return self._examples('train', self._train.batch(step)['label'])

  def eval_batches(self) -> Iterable[dict[str, np.ndarray]]:
    return self._eval

  def metadata(self) -> dict[str, Any]:
    return {**super().metadata(), 'vocab_size': self.tokenizer.vocab_size}

  def load_metadata(self, metadata: dict[str, Any]) -> None:
    super().load_metadata(metadata)
    if metadata.get('vocab_size') != self.tokenizer.vocab_size:
      raise UserError(f'the run\'s caption vocabulary has {metadata.get("vocab_size")} words, '
                      f'train/captions.py\'s {self.tokenizer.vocab_size}: written by another '
                      'version of the caption grammar')

  def condition(self, batch):
    return batch['tokens']

  def null_condition(self):
    return captions.null_tokens(1, self.max_len)[0]   # [L]

  # ---- model ----
  def make_models(self, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    m, t = self.config.model, self.config.text
    return {'model': t2i_lib.TextToImageUNet(
        text=dict(vocab_size=self.tokenizer.vocab_size, max_len=t.max_len,
                  num_layers=t.num_layers, num_heads=t.num_heads, embed_dim=t.embed_dim,
                  dropout=t.dropout, dropout_bits=self.dropout_bits, pad_id=captions.PAD_ID),
        unet=dict(image_shape=self.image_shape, channels=m.channels,
                  channel_mult=tuple(m.channel_mult), num_res_blocks=m.num_res_blocks,
                  attention_resolutions=tuple(m.attention_resolutions), dropout=m.dropout,
                  dropout_bits=self.dropout_bits, groups=m.groups,
                  group_norm_sums=self.group_norm_sums, context_heads=m.context_heads),
        dtype=images_lib.activation_dtype(self.config), rngs=rngs)}

  # ---- sampling ----
  def prompt_tokens(self, prompt: str) -> np.ndarray:
    """[L] tokens of a user's prompt; UserError naming --prompt when it is empty or has no
    word the captions use."""
    try:
      return self.tokenizer.encode_prompt(prompt, self.max_len)
    except ValueError as e:
      raise UserError(f'--prompt: {e}') from None

  def default_prompts(self, num: int) -> list[str]:
    """Captions cycling through the classes and attribute combinations (training grids)."""
    names = captions.DATASET_ATTRIBUTES[self.config.data.name]
    sizes = [len(captions.ATTRIBUTES[n]) for n in names]
    i = np.arange(num)
    categories, rest = {}, i // 10
    for name, size in zip(names, sizes):
      categories[name], rest = rest % size, rest // size
    return captions.describe(i % 10, categories, dataset=self.config.data.name, seed=0)

  def default_labels(self, num: int) -> np.ndarray:
    return self.tokenizer.encode(self.default_prompts(num), self.max_len)

  def caption(self, labels):
    return None if labels is None else [self.tokenizer.decode(row) for row in labels]

  def likelihood_metrics(self, models, rng, images, labels, **options) -> dict[str, float]:
    del models, rng, images, labels, options   # the bound is conditional on class labels
    return {}

  def sample(self, models, rng, workdir: str, options: dict[str, Any]) -> str:
    """`train.sample`: --num_samples images (default 8) of each prompt in --prompt (several
    separated by ';'; default: one caption per class), as a PNG grid of one row per prompt."""
    per_prompt = options.pop('num_samples', None)
    per_prompt = 8 if per_prompt is None else int(per_prompt)
    if per_prompt < 1:
      raise UserError(f'--num_samples={per_prompt}: must be >= 1')
    prompt = options.pop('prompt', None)
    prompts = self.default_prompts(10) if prompt is None else prompt.split(';')
    tokens = np.repeat(np.stack([self.prompt_tokens(p) for p in prompts]), per_prompt, axis=0)
    out = options.pop('out', None) or storage.join(workdir, 'samples', 'sample.png')
    options = self.check_sample_options({k: v for k, v in options.items() if v is not None})
    images, _ = images_lib.generate_in_batches(self, models, rng, len(tokens), tokens, options,
                                               self.sampling_batch())
    if not out.endswith('.png'):
      out += '.png'
    grid = images_lib.prompt_grid([p.strip() for p in prompts],
                                  images.reshape(len(prompts), per_prompt, *images.shape[1:]))
    storage.save_image(out, grid)
    return f'wrote {len(prompts)} x {per_prompt} samples to {out}'

  # ---- evaluation ----
  @property
  def evaluate_flags(self) -> tuple[str, ...]:
    from train import text2image_eval   # pylint: disable=import-outside-toplevel
    return text2image_eval.EVALUATE_FLAGS

  def evaluate(self, models, workdir: str, step: int, options: dict[str, Any]) -> str:
    from train import text2image_eval   # pylint: disable=import-outside-toplevel
    return text2image_eval.evaluate_prompts(self, models, workdir, step, options)
