r"""The UNet's pieces timed alone on XLA:CPU, beside PyTorch's where it is installed.

For each 3x3 'SAME' convolution shape of `ddpm_mnist.py`'s UNet (batch 64): the forward, the
input gradient (dx) and the weight gradient (dW), each jitted alone; GroupNorm (8 groups,
flax's `nnx.GroupNorm`) forward + backward; and nearest 2x upsampling's backward, as a
broadcast (`models.upsample.upsample_nearest`, what the UNet uses) and through
`jax.image.resize`; and the GroupNorm whose sums over positions are all batched dots, forward
and backward (`models.unet.group_norm_dots`, `group_norm_sums='dot'`; checked against flax's
before it is timed). With `--unet_rounds=N` (needs MNIST: TFDS_DATA_DIR) also the whole UNet
train step with its GroupNorms as flax's, as batched dots, and as their affine alone (no
normalisation: the most a faster GroupNorm could save), and its forward pass (what a sampler
calls) in the same three forms, alternating. With torch installed (`pip
install -e '.[peers]'`) the same convolution (NCHW, forward and forward + backward) and
`torch.nn.GroupNorm` are timed too. Milliseconds, the median of 5 chunks. The process starts
XLA as every genlab command does (train.cli.tune_host: XLA's own convolutions);
`GENLAB_XLA_TUNING=0` leaves XLA's defaults (YNNPACK convolutions).

  python -m experiments.benchmark_ops [--batch=64] [--repeats=10]
  TFDS_DATA_DIR=... python -m experiments.benchmark_ops --unet_rounds=5
  GENLAB_XLA_TUNING=0 python -m experiments.benchmark_ops

Run one benchmark at a time (nothing else heavy on the machine).
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from typing import Callable
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from models import unet as unet_lib
from models import upsample
from train import cli

_BATCH = flags.DEFINE_integer('batch', 64, 'Batch of every timed op.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Calls per timed chunk.')
_UNET_ROUNDS = flags.DEFINE_integer(
    'unet_rounds', 0, 'Also time the UNet train step and forward pass with its GroupNorms as '
    'flax\'s, as batched dots and as the affine alone, over this many alternating rounds (0: not).')

# (resolution, in channels, out channels) of the UNet's 3x3 convolutions (16-32-64 at 28/14/7;
# the up path's inputs concatenate a skip).
CONV_SHAPES = ((28, 16, 16), (28, 48, 32), (14, 32, 32), (7, 64, 64))
NORM_SHAPES = ((28, 32), (14, 64))


def timed(fn: Callable[[], object], repeats: int) -> float:
  """Median milliseconds per call over 5 chunks of `repeats` calls (after one warm-up call)."""
  jax.block_until_ready(fn())
  chunks = []
  for _ in range(5):
    t = time.perf_counter()
    for _ in range(repeats):
      jax.block_until_ready(fn())
    chunks.append((time.perf_counter() - t) / repeats)
  return 1e3 * statistics.median(chunks)


def conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class _AffineOnly(unet_lib.GroupNorm):
  """The UNet GroupNorm's scale and bias without the normalisation: a UNet step with it bounds
  what any faster GroupNorm could save (not a model to train)."""

  def __call__(self, x, *, mask=None):
    del mask
    return x * self.scale[...] + self.bias[...]


def unet_step_rows(rounds: int) -> list[list[str]]:
  """The UNet (`ddpm_mnist.py:cond`, batch 64) with its GroupNorms as flax's, as batched dots
  (`group_norm_sums='dot'`) and as the affine alone: its train step (the loop's jitted step) in
  chunks of 5 steps and its forward pass (a sampler's network call, jitted alone) in chunks of 10
  calls, alternating over `rounds` rounds (needs MNIST: TFDS_DATA_DIR)."""
  # pylint: disable=import-outside-toplevel
  from experiments import benchmark_peers
  from experiments.configs import ddpm_mnist
  from train.families.diffusion import DiffusionFamily
  steps, forwards = {}, {}
  for name, sums, norm in (('flax', 'reduce', unet_lib.GroupNorm),
                           ('dots', 'dot', unet_lib.GroupNorm),
                           ('affine only', 'reduce', _AffineOnly)):
    with mock.patch.object(unet_lib, 'GroupNorm', norm):
      config = ddpm_mnist.get_config('cond')
      config.model.group_norm_sums = sums
      family = DiffusionFamily(config)
      family.setup_data(0, 1)
      batches = [family.train_batch(i) for i in range(4)]
      steps[name], _, builder, current_state = benchmark_peers.genlab_train_runner(
          config, family, batches)
      state = current_state()
      graphdef, params = nnx.split(builder.models(builder.sampling_params(state),
                                                  state['rest'])['model'])
      params = jax.tree.map(jnp.copy, params)   # the train step donates the state's buffers
    x = jax.random.normal(jax.random.key(0), (64, *family.image_shape))
    t = jnp.full((64,), 500, jnp.int32)
    labels = jnp.asarray(np.arange(64) % family.num_classes, jnp.int32)
    forward = jax.jit(lambda p, x, t, y, g=graphdef: nnx.merge(g, p)(x, t, y)).lower(
        params, x, t, labels).compile()
    forwards[name] = functools.partial(forward, params, x, t, labels)
  times = {name: ([], []) for name in steps}
  for _ in range(rounds):
    for name in steps:
      times[name][0].append(1e3 * steps[name](5))
      times[name][1].append(timed(forwards[name], 10))
  chunks = lambda t: ', '.join(f'{v:.0f}' for v in t)
  return [[f'UNet, GroupNorms as {name}',
           f'train step {statistics.median(a):.1f} ms (chunks: {chunks(a)}); forward '
           f'{statistics.median(b):.1f} ms (medians: {chunks(b)})']
          for name, (a, b) in times.items()]


def main(argv):
  del argv
  try:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(len(os.sched_getaffinity(0)))
  except ImportError:
    torch = None
  b, n = _BATCH.value, _REPEATS.value
  rng = np.random.default_rng(0)
  rows = []
  for res, cin, cout in CONV_SHAPES:
    x = rng.normal(size=(b, res, res, cin)).astype(np.float32)
    w = (rng.normal(size=(3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
    g = rng.normal(size=(b, res, res, cout)).astype(np.float32)
    fwd = jax.jit(conv)
    dx = jax.jit(lambda x, w, g: jax.vjp(lambda a: conv(a, w), x)[1](g)[0])
    dw = jax.jit(lambda x, w, g: jax.vjp(lambda k: conv(x, k), w)[1](g)[0])
    row = [f'conv 3x3 {res}x{res}, {cin} -> {cout}',
           f'fwd {timed(lambda: fwd(x, w), n):.2f}, dx {timed(lambda: dx(x, w, g), n):.2f}, '
           f'dW {timed(lambda: dw(x, w, g), n):.2f}']
    if torch is not None:
      xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_()
      wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous().requires_grad_()
      gt = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous()

      def torch_fwd():
        with torch.no_grad():
          return torch.nn.functional.conv2d(xt, wt, padding=1)

      def torch_both():
        torch.nn.functional.conv2d(xt, wt, padding=1).backward(gt)

      row.append(f'fwd {timed(torch_fwd, n):.2f}, fwd + dx + dW {timed(torch_both, n):.2f}')
    rows.append(row)
  for res, ch in NORM_SHAPES:
    x = rng.normal(size=(b, res, res, ch)).astype(np.float32)
    g = rng.normal(size=(b, res, res, ch)).astype(np.float32)
    flax_norm = nnx.GroupNorm(ch, num_groups=8, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(flax_norm)
    both = jax.jit(lambda s, x, g: jax.vjp(lambda s, x: nnx.merge(graphdef, s)(x), s, x)[1](g))
    params = (flax_norm.scale.value, flax_norm.bias.value)
    dots = jax.jit(lambda p, x, g: jax.vjp(
        lambda p, x: unet_lib.group_norm_dots(x, *p, 8, flax_norm.epsilon), p, x)[1](g))
    # The dot form must compute what flax's does before its time means anything.
    (d_scale, d_bias), dx = dots(params, x, g)
    d_state, want_dx = both(state, x, g)
    for got, want in ((dx, want_dx), (d_scale, d_state['scale']), (d_bias, d_state['bias'])):
      np.testing.assert_allclose(got, getattr(want, 'value', want), rtol=1e-4, atol=1e-3)
    row = [f'GroupNorm (8 groups) {res}x{res}x{ch}',
           f'fwd + bwd {timed(lambda: both(state, x, g), n):.2f}; sums as batched dots '
           f'{timed(lambda: dots(params, x, g), n):.2f}']
    if torch is not None:
      norm = torch.nn.GroupNorm(8, ch)
      xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_()
      gt = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous()
      row.append(f'fwd + bwd {timed(lambda: norm(xt).backward(gt), n):.2f}')
    rows.append(row)
  x = rng.normal(size=(b, 14, 14, 64)).astype(np.float32)
  g = rng.normal(size=(b, 28, 28, 64)).astype(np.float32)
  resize = lambda h: jax.image.resize(h, (b, 28, 28, 64), 'nearest')
  grads = {name: jax.jit(lambda x, g, f=f: jax.vjp(f, x)[1](g)[0])
           for name, f in (('broadcast', upsample.upsample_nearest), ('resize', resize))}
  rows.append(['nearest 2x upsampling 14x14x64, backward',
               ', '.join(f'{name} {timed(lambda f=f: f(x, g), n):.2f}'
                         for name, f in grads.items())])
  if _UNET_ROUNDS.value:
    rows += unet_step_rows(_UNET_ROUNDS.value)
  print(f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; batch {b}; jax {jax.__version__}'
        + (f', torch {torch.__version__} ({torch.get_num_threads()} threads)' if torch else ''))
  print('\n| op | genlab (jax), ms | PyTorch, ms |\n|---|---|---|')
  for row in rows:
    print('| ' + ' | '.join(row + [''] * (3 - len(row))) + ' |')


if __name__ == '__main__':
  cli.tune_host()  # as the train/sample/evaluate commands do
  app.run(main)
