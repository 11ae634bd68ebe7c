r"""The UNet's pieces timed alone on XLA:CPU, beside PyTorch's where it is installed.

For each 3x3 'SAME' convolution shape of `ddpm_mnist.py`'s UNet (batch 64): the forward, the
input gradient (dx) and the weight gradient (dW), each jitted alone; GroupNorm (8 groups,
flax's `nnx.GroupNorm`) forward + backward; and nearest 2x upsampling's backward, as a
broadcast (`models.upsample.upsample_nearest`, what the UNet uses) and through
`jax.image.resize`; and a candidate GroupNorm with its statistics as dots
(`group_norm_as_dots`, checked against flax's before it is timed). With torch installed (`pip
install -e '.[peers]'`) the same convolution (NCHW, forward and forward + backward) and
`torch.nn.GroupNorm` are timed too. Milliseconds, the median of 5 chunks. The process starts
XLA as every genlab command does (train.cli.tune_host: XLA's own convolutions);
`GENLAB_XLA_TUNING=0` leaves XLA's defaults (YNNPACK convolutions).

  python -m experiments.benchmark_ops [--batch=64] [--repeats=10]
  GENLAB_XLA_TUNING=0 python -m experiments.benchmark_ops

Run one benchmark at a time (nothing else heavy on the machine).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from models import upsample
from train import cli

_BATCH = flags.DEFINE_integer('batch', 64, 'Batch of every timed op.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Calls per timed chunk.')

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


def group_norm_as_dots(x, scale, bias, groups: int, eps: float = 1e-6):
  """GroupNorm of NHWC `x` with its statistics as dots: the per-channel sums of x and x^2 over
  the positions contract with a ones vector, and a [C, G] indicator matrix sums channels into
  groups and spreads the groups' mean and 1/std back. Same formula as flax's GroupNorm
  (variance as E[x^2] - E[x]^2, flax's `use_fast_variance`). A candidate timed beside
  `nnx.GroupNorm`; the UNet does not use it."""
  n, h, w, c = x.shape
  flat = x.reshape(n, h * w, c)
  ones = jnp.ones((h * w,), x.dtype)
  per_group = c // groups
  member = (jnp.arange(c)[:, None] // per_group == jnp.arange(groups)[None]).astype(x.dtype)
  count = h * w * per_group
  mean = jnp.einsum('nsc,s->nc', flat, ones) @ member / count                 # [N, G]
  mean_sq = jnp.einsum('nsc,s->nc', flat * flat, ones) @ member / count
  inv_std = jax.lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + eps)
  a = (inv_std @ member.T) * scale                                            # [N, C]
  b = bias - (mean @ member.T) * a
  return x * a[:, None, None, :] + b[:, None, None, :]


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
        lambda p, x: group_norm_as_dots(x, *p, groups=8, eps=flax_norm.epsilon), p, x)[1](g))
    # The candidate must compute what flax's does before its time means anything.
    (d_scale, d_bias), dx = dots(params, x, g)
    d_state, want_dx = both(state, x, g)
    for got, want in ((dx, want_dx), (d_scale, d_state['scale']), (d_bias, d_state['bias'])):
      np.testing.assert_allclose(got, getattr(want, 'value', want), rtol=1e-4, atol=1e-3)
    row = [f'GroupNorm (8 groups) {res}x{res}x{ch}',
           f'fwd + bwd {timed(lambda: both(state, x, g), n):.2f}; statistics as dots '
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
  print(f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; batch {b}; jax {jax.__version__}'
        + (f', torch {torch.__version__} ({torch.get_num_threads()} threads)' if torch else ''))
  print('\n| op | genlab (jax), ms | PyTorch, ms |\n|---|---|---|')
  for row in rows:
    print('| ' + ' | '.join(row + [''] * (3 - len(row))) + ' |')


if __name__ == '__main__':
  cli.tune_host()  # as the train/sample/evaluate commands do
  app.run(main)
