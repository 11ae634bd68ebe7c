"""The classifier family: a small CNN trained on an image dataset with cross-entropy.

It is the feature extractor of image evaluation (`python -m train.evaluate --classifier=DIR`):
its workdir (config, metadata and orbax checkpoint written by the shared loop) is all that
evaluation needs. It generates nothing: its end-of-run "samples" are test images captioned
with the predicted class.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import classifier as classifier_lib
from train import images as images_lib
from train.errors import UserError
from train.family import dropout_bits


def random_shift(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
  """Translates each [batch, H, W, C] image by up to `max_shift` pixels in each direction,
  filling with the background value -1 (black)."""
  if max_shift <= 0:
    return images
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                   constant_values=-1.0)
  offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


class ClassifierFamily(images_lib.ImageFamily):
  """config.model: channels (two conv widths), hidden (feature width), dropout, dropout_bits;
  config.augment_shift: random translation in pixels during training (0: none)."""

  name = 'classifier'
  sample_flags = ()

  def make_models(self, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    m = self.config.model
    return {'model': classifier_lib.Classifier(
        image_shape=self.image_shape, num_classes=len(self.class_names),
        channels=tuple(m.channels), hidden=m.hidden, dropout=m.dropout,
        dropout_bits=dropout_bits(m),
        dtype=images_lib.activation_dtype(self.config), rngs=rngs)}

  def loss(self, models, batch, rng, *, train: bool):
    x = images_lib.to_float(batch['image'])
    shift_key, dropout_key = jax.random.split(rng)
    if train:
      x = random_shift(x, shift_key, int(self.config.get('augment_shift', 0)))
    logits = models['model'](x, dropout_key=dropout_key if train else None)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    accuracy = (jnp.argmax(logits, -1) == batch['label']).mean()
    return loss, {'accuracy': accuracy}

  def sample(self, models, rng, workdir, options) -> str:
    raise UserError(f'--workdir={workdir}: a classifier generates no images; use it as '
                    '`python -m train.evaluate --classifier=DIR`')

  def write_samples(self, models, rng, path: str) -> None:
    """A grid of the first 64 test images captioned with their predicted class."""
    batch = next(iter(self.eval_batches()))
    images = batch['image'][:64]
    logits = models['model'](images_lib.to_float(jnp.asarray(images)))
    predicted = np.asarray(jnp.argmax(logits, -1))
    images_lib.save_grid(path, images, self.caption(predicted))
