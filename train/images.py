"""What every image family shares: data, sample grids, the image sampling interface.

An image family (diffusion, VAE, GAN, the evaluation classifier) subclasses `ImageFamily`: it
gets MNIST-style data loading (whole splits in memory, step-indexed shuffled batches), fixed
evaluation batches, metadata that lets sampling run without the dataset, PNG sample grids and
the `train.sample` command, and implements `generate_images`. `train.evaluate` scores any
`ImageFamily` through `generate_images`.

Pixels: datasets hold uint8 [N, H, W, C]; `to_float` maps them to [-1, 1] and `to_uint8` back.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from train import data as data_lib
from train import metrics as metrics_lib
from train import storage
from train.errors import UserError
from train.family import Family


def to_float(images):
  """uint8 [0, 255] -> float32 [-1, 1] (works on numpy and jax arrays)."""
  return images.astype('float32') / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255] (clipped), as numpy."""
  x = np.asarray(jax.device_get(images), np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, labels: Sequence[str] | None = None,
               ncols: int | None = None, pad: int = 2) -> Image.Image:
  """A PIL image tiling uint8 [N, H, W, C] images; each tile captioned when `labels` is given."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'image_grid wants uint8 [N, H, W, 1|3], got {images.dtype} {images.shape}')
  n, h, w, c = images.shape
  ncols = ncols or max(1, math.ceil(math.sqrt(n)))
  nrows = max(1, math.ceil(n / ncols))
  caption = 11 if labels is not None else 0
  grid = np.full((nrows * (h + pad + caption) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, ncols)
    y = pad + r * (h + pad + caption) + caption
    x = pad + q * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  out = Image.fromarray(grid[..., 0] if c == 1 else grid).convert('RGB')
  if labels is not None:
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for i, text in enumerate(labels):
      r, q = divmod(i, ncols)
      draw.text((pad + q * (w + pad), r * (h + pad + caption) + 1), str(text)[:max(1, w // 6)],
                fill=(200, 0, 0), font=font)
  return out


def prompt_grid(prompts: Sequence[str], images: np.ndarray, scale: int = 2,
                pad: int = 2) -> Image.Image:
  """A PIL image with one row per prompt: its text, then its uint8 [K, H, W, C] images
  (`images` is [len(prompts), K, H, W, C]), each shown `scale` times larger."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 5 or len(images) != len(prompts):
    raise ValueError(f'prompt_grid wants uint8 [prompts, K, H, W, C] for {len(prompts)} '
                     f'prompts, got {images.dtype} {images.shape}')
  p, k, h, w, _ = images.shape
  font = ImageFont.load_default()
  text_w = max(int(font.getlength(t)) for t in prompts) + 3 * pad
  tile_h, tile_w = h * scale + pad, w * scale + pad
  out = Image.new('RGB', (text_w + k * tile_w + pad, p * tile_h + pad), (255, 255, 255))
  draw = ImageDraw.Draw(out)
  for i, text in enumerate(prompts):
    draw.text((pad, pad + i * tile_h + tile_h // 2 - 6), text, fill=(0, 0, 0), font=font)
    for j in range(k):
      tile = Image.fromarray(images[i, j, ..., 0] if images.shape[-1] == 1 else images[i, j])
      out.paste(tile.convert('RGB').resize((w * scale, h * scale), Image.NEAREST),
                (text_w + j * tile_w, pad + i * tile_h))
  return out


def save_grid(path: str, images: np.ndarray, labels: Sequence[str] | None = None,
              ncols: int | None = None) -> str:
  """Writes `image_grid(...)` to `path` (.png added when missing); returns the path."""
  if not path.endswith('.png'):
    path += '.png'
  storage.save_image(path, image_grid(images, labels, ncols))
  return path


_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def activation_dtype(config) -> Any:
  """config.model.dtype ('float32' | 'bfloat16' activations; params stay float32) as a dtype."""
  name = config.model.get('dtype', 'float32')  # runs saved before the key existed: float32
  if name not in _DTYPES:
    raise UserError(f'config.model.dtype={name!r}: use one of {sorted(_DTYPES)}')
  return _DTYPES[name]


def parse_labels(text: str | None, num: int, num_classes: int) -> np.ndarray | None:
  """`--labels`: None/'' -> None; 'all' -> 0, 1, ..., K-1 repeated; '3' or '1,7' -> cycled to `num`.

  Raises UserError for a label outside [0, num_classes) or labels on an unconditional model.
  """
  if text is None or text == '':
    return None
  if num_classes <= 0:
    raise UserError(f'--labels={text}: this model is unconditional (trained without labels)')
  if text == 'all':
    values = list(range(num_classes))
  else:
    try:
      values = [int(v) for v in text.split(',')]
    except ValueError:
      raise UserError(f'--labels={text}: expected "all" or comma-separated class ids') from None
  for v in values:
    if not 0 <= v < num_classes:
      raise UserError(f'--labels={text}: label {v} is outside the classes 0..{num_classes - 1}')
  return np.resize(np.asarray(values, np.int32), num)


def generate_in_batches(family: ImageFamily, models, rng: jax.Array, num: int,
                        labels: np.ndarray | None, options: dict[str, Any], batch: int,
                        what: str = 'sampling') -> tuple[np.ndarray, list[tuple[int, float]]]:
  """uint8 [num, H, W, C] from `family.generate_images`, `batch` images at a time (batch i with
  key fold_in(rng, i)), printing a progress line (images/s, ETA) per batch.

  Returns: (the images, [(images, seconds)] per batch; the first batch includes compilation).
  """
  batches = math.ceil(num / batch)
  progress = metrics_lib.Progress(
      what, num, note=f'{batches} batch{"es" if batches > 1 else ""} of up to {batch}; '
      'the first one includes compilation')
  chunks, times = [], []
  for i, lo in enumerate(range(0, num, batch)):
    n = min(batch, num - lo)
    t0 = time.perf_counter()
    images = np.asarray(family.generate_images(
        models, jax.random.fold_in(rng, i), n, None if labels is None else labels[lo:lo + n],
        **options))
    times.append((n, time.perf_counter() - t0))
    if images.shape != (n,) + tuple(family.image_shape) or images.dtype != np.uint8:
      raise RuntimeError(f'{family.name}.generate_images returned {images.dtype} '
                         f'{images.shape}, expected uint8 {(n,) + tuple(family.image_shape)}')
    chunks.append(images)
    progress.update(n)
  return np.concatenate(chunks), times


class ImageFamily(Family):
  """A family that trains on and generates images.

  config.data: name (TFDS image dataset), data_dir, raw_dir; config.eval_batches: number of
  test batches each eval averages over (<= 0: the whole test split); config.conditional: bool,
  whether the family is class-conditional (then `num_classes` > 0).
  Subclasses implement `make_models`, `loss` and `generate_images`.
  """

  unit = 'images'
  sample_flags = ('num_samples', 'labels', 'out')

  def __init__(self, config):
    super().__init__(config)
    if 'model' in config:
      activation_dtype(config)  # a bad dtype fails before anything is built
    self.image_shape: tuple[int, int, int] | None = None
    self.class_names: list[str] = []

  @property
  def conditional(self) -> bool:
    return bool(self.config.get('conditional', False))

  @property
  def num_classes(self) -> int:
    """Classes the model can be asked for; 0 when unconditional."""
    return len(self.class_names) if self.conditional else 0

  # ---- data ----
  def setup_data(self, process_index: int, process_count: int) -> None:
    c = self.config
    ds = data_lib.load_images(c.data.name, c.data.data_dir, c.data.raw_dir)
    train_split = 'train'
    eval_split = 'test' if 'test' in ds else train_split
    images, labels = ds[train_split]
    self.image_shape = tuple(images.shape[1:])
    self.class_names = list(ds.class_names)
    self._train = data_lib.ImageBatches(
        images, labels, global_batch_size=c.batch_size, seed=c.seed,
        process_index=process_index, process_count=process_count)
    self._eval = data_lib.fixed_batches(
        *ds[eval_split], global_batch_size=c.batch_size, num_batches=c.get('eval_batches', 10),
        process_index=process_index, process_count=process_count)

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    return self._train.batch(step)

  def eval_batches(self) -> Iterable[dict[str, np.ndarray]]:
    return self._eval

  def metadata(self) -> dict[str, Any]:
    return {'image_shape': list(self.image_shape), 'class_names': self.class_names}

  def load_metadata(self, metadata: dict[str, Any]) -> None:
    self.image_shape = tuple(metadata['image_shape'])
    self.class_names = list(metadata['class_names'])

  # ---- sampling ----
  def generate_images(self, models, rng: jax.Array, num: int, labels: np.ndarray | None = None,
                      **options) -> np.ndarray:
    """uint8 [num, H, W, C] samples; `labels` ([num] int32) requests classes when conditional.

    `options` are the family's own sampling flags (e.g. sampler, steps, guidance for diffusion),
    already validated by `check_sample_options`.
    """
    raise NotImplementedError(f'family {self.name!r} does not implement generate_images')

  def likelihood_metrics(self, models, rng: jax.Array, images: np.ndarray, labels: np.ndarray,
                         **options) -> dict[str, float]:
    """Likelihood-based test metrics where the family defines them (VAE: IWAE NLL in nats;
    diffusion: variational bound in bits/dim) on uint8 test `images`; {} otherwise.
    `train.evaluate` adds them to its report."""
    return {}

  def likelihood_descriptions(self) -> dict[str, str]:
    """What each `likelihood_metrics` figure is, for the report (key -> one phrase)."""
    return {}

  @property
  def evaluate_flags(self) -> tuple[str, ...]:
    from train import evaluate as evaluate_lib  # pylint: disable=import-outside-toplevel
    return tuple(self.sample_flags) + evaluate_lib.IMAGE_EVALUATE_FLAGS

  def evaluate(self, models, workdir: str, step: int, options: dict[str, Any]) -> str:
    """Frechet distance, precision/recall, coverage: see train/evaluate.py."""
    from train import evaluate as evaluate_lib  # pylint: disable=import-outside-toplevel
    return evaluate_lib.evaluate_images((self, models, step), workdir)

  def check_sample_options(self, options: dict[str, Any]) -> dict[str, Any]:
    """Validates the family's own sampling options (UserError naming the flag); returns them."""
    return options

  def sampling_batch(self) -> int | None:
    """Images per `generate_images` call in `train.sample` (None: all at once)."""
    return None

  def default_labels(self, num: int) -> np.ndarray | None:
    return np.arange(num, dtype=np.int32) % self.num_classes if self.num_classes else None

  def caption(self, labels: np.ndarray | None) -> list[str] | None:
    return None if labels is None else [self.class_names[int(l)] for l in labels]

  def sample(self, models, rng: jax.Array, workdir: str, options: dict[str, Any]) -> str:
    """`train.sample` for images: writes a PNG grid; returns a line saying where."""
    num = options.pop('num_samples', None)
    num = 64 if num is None else int(num)
    if num < 1:
      raise UserError(f'--num_samples={num}: must be >= 1')
    labels = parse_labels(options.pop('labels', None), num, self.num_classes)
    if labels is None:
      labels = self.default_labels(num)
    out = options.pop('out', None) or storage.join(workdir, 'samples', 'sample.png')
    options = self.check_sample_options({k: v for k, v in options.items() if v is not None})
    images, _ = generate_in_batches(self, models, rng, num, labels, options,
                                    self.sampling_batch() or num)
    path = save_grid(out, images, self.caption(labels))
    return f'wrote {num} samples to {path}'

  def write_samples(self, models, rng, path: str) -> None:
    num = int(self.config.get('sample_count', 64))
    labels = self.default_labels(num)
    options = self.check_sample_options({})
    images = self.generate_images(models, rng, num, labels, **options)
    save_grid(path, images, self.caption(labels))
