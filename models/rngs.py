"""`nnx.Rngs` for building a model inside `jax.jit` / `jax.eval_shape` without quadratic tracing.

Each `nnx.RngStream` call (one per initialised param) does `count[...] += 1`. Under tracing,
Flax 0.12's indexed `Variable.set_value` then asks the traced count for its `.sharding`, and
JAX builds the `AttributeError` it raises with `_origin_msg`, which scans every equation traced
so far and pretty-prints some of them: tracing a model's init costs O(params x equations), and
for the MNIST UNet of `experiments/configs/ddpm_mnist.py` that is seconds per trace (every
command traces an init twice: `jax.eval_shape`, then the jitted init). `rngs()` below avoids it.

`rngs(key)` is `nnx.Rngs(key)` whose streams count with a plain `set_value`: the same keys in the
same order (tests/test_rngs.py checks params, eagerly and under jit, against `nnx.Rngs`).
"""

from __future__ import annotations

import jax
from flax import nnx


class CountingStream(nnx.RngStream):
  """An `nnx.RngStream` whose call replaces its count instead of assigning `count[...]`."""

  def __call__(self) -> jax.Array:
    self.count._check_can_update()  # pylint: disable=protected-access
    count = self.count.get_value()
    key = jax.random.fold_in(self.key.get_value(), count)
    self.count.set_value(count + 1)
    return key


def rngs(key: int | jax.Array) -> nnx.Rngs:
  """`nnx.Rngs(key)` (one 'default' stream) with a `CountingStream`."""
  out = nnx.Rngs(key)
  for tag, stream in list(vars(out).items()):
    if isinstance(stream, nnx.RngStream):
      setattr(out, tag, CountingStream(stream.key.get_value(), tag=tag))
  return out
