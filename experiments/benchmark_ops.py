r"""The UNet's pieces timed alone on XLA:CPU, beside PyTorch's where it is installed.

For each 3x3 'SAME' convolution shape of `ddpm_mnist.py`'s UNet (batch 64): the forward, the
input gradient (dx) and the weight gradient (dW), each jitted alone; GroupNorm (8 groups,
flax's `nnx.GroupNorm`) forward + backward; and nearest 2x upsampling's backward, as a
broadcast (`models.upsample.upsample_nearest`, what the UNet uses) and through
`jax.image.resize`; and a candidate GroupNorm whose sums over positions are all batched dots,
forward and backward (`group_norm_dots`, checked against flax's before it is timed). With
`--unet_rounds=N` (needs MNIST: TFDS_DATA_DIR) also the whole UNet train step with its
GroupNorms as flax's, as the candidate, and as their affine alone (no normalisation: the most a
faster GroupNorm could save), alternating. With torch installed (`pip
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

from models import upsample
from train import cli

_BATCH = flags.DEFINE_integer('batch', 64, 'Batch of every timed op.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Calls per timed chunk.')
_UNET_ROUNDS = flags.DEFINE_integer(
    'unet_rounds', 0, 'Also time the UNet train step with its GroupNorms as flax\'s, as '
    'group_norm_dots and as the affine alone, over this many alternating rounds (0: not).')

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


def _position_sums(*arrays):
  """Per-(image, channel) sums over the positions of `[N, S, C]` arrays, each as a batched
  `[1, S] @ [S, C]` dot: XLA:CPU hands these to YNNPACK, where a reduce over S runs several
  times slower (`jnp.sum(x, axis=1)`: its own loop emitter)."""
  ones = jnp.ones((arrays[0].shape[0], 1, arrays[0].shape[1]), jnp.float32)
  return [jnp.matmul(ones, a)[:, 0, :] for a in arrays]


def _group_mean(v, groups: int, count: int):
  """[N, C] per-channel sums -> [N, C]: each channel gets its group's sum / count."""
  n, c = v.shape
  return jnp.repeat(v.reshape(n, groups, c // groups).sum(-1), c // groups, axis=1) / count


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm_dots(x, scale, bias, groups: int, eps: float = 1e-6):
  """GroupNorm of NHWC `x` (flax's formula: variance as E[x^2] - E[x]^2, `use_fast_variance`)
  with every sum over the positions a batched dot (`_position_sums`), in the forward (sums of
  x and x^2) and in a hand-written backward (sums of dy and dy * x); the normalisation and dx
  are each one elementwise pass with per-(image, channel) coefficients. A candidate timed
  beside `nnx.GroupNorm`; the UNet does not use it."""
  return _group_norm_fwd(x, scale, bias, groups, eps)[0]


def _group_norm_stats(x, groups, eps):
  n, h, w, c = x.shape
  flat = x.reshape(n, h * w, c).astype(jnp.float32)
  count = h * w * (c // groups)
  s1, s2 = _position_sums(flat, flat * flat)
  mean = _group_mean(s1, groups, count)
  inv_std = jax.lax.rsqrt(jnp.maximum(_group_mean(s2, groups, count) - mean * mean, 0.0) + eps)
  return mean, inv_std                                                       # [N, C] each


def _group_norm_fwd(x, scale, bias, groups, eps):
  mean, inv_std = _group_norm_stats(x, groups, eps)
  a = inv_std * scale
  b = bias - mean * a
  y = x * a[:, None, None, :] + b[:, None, None, :]
  return y.astype(x.dtype), (x, scale, mean, inv_std)


def _group_norm_bwd(groups, eps, residuals, dy):
  del eps
  x, scale, mean, inv_std = residuals
  n, h, w, c = x.shape
  flat = x.reshape(n, h * w, c).astype(jnp.float32)
  g = dy.reshape(n, h * w, c).astype(jnp.float32)
  sum_dy, sum_dy_x = _position_sums(g, g * flat)
  sum_dy_xhat = inv_std * (sum_dy_x - mean * sum_dy)      # sum over positions of dy * x_hat
  count = h * w * (c // groups)
  m1 = _group_mean(scale * sum_dy, groups, count)          # group means of d x_hat ...
  m2 = _group_mean(scale * sum_dy_xhat, groups, count)     # ... and of d x_hat * x_hat
  # dx = inv_std * (d x_hat - m1 - x_hat * m2), with x_hat = (x - mean) * inv_std.
  k_dy, k_x = inv_std * scale, -inv_std * inv_std * m2
  k_0 = -inv_std * m1 - k_x * mean
  dx = dy * k_dy[:, None, None, :] + x * k_x[:, None, None, :] + k_0[:, None, None, :]
  return (dx.astype(x.dtype), sum_dy_xhat.sum(0).astype(scale.dtype),
          sum_dy.sum(0).astype(scale.dtype))


group_norm_dots.defvjp(_group_norm_fwd, _group_norm_bwd)


class _GroupNormDots(nnx.GroupNorm):
  """`nnx.GroupNorm` (the same params) computed by `group_norm_dots`."""

  def __call__(self, x, *, mask=None):
    del mask
    return group_norm_dots(x, self.scale[...], self.bias[...], self.num_groups, self.epsilon)


class _AffineOnly(nnx.GroupNorm):
  """`nnx.GroupNorm`'s scale and bias without the normalisation: a UNet step with it bounds
  what any faster GroupNorm could save (not a model to train)."""

  def __call__(self, x, *, mask=None):
    del mask
    return x * self.scale[...] + self.bias[...]


def unet_step_rows(rounds: int) -> list[list[str]]:
  """The UNet train step (`ddpm_mnist.py:cond`, batch 64, the loop's jitted step) with its
  GroupNorms as flax's, as `group_norm_dots` and as the affine alone, timed in alternating
  chunks of 5 steps over `rounds` rounds (needs MNIST: TFDS_DATA_DIR)."""
  # pylint: disable=import-outside-toplevel
  from experiments import benchmark_peers
  from experiments.configs import ddpm_mnist
  from train.families.diffusion import DiffusionFamily
  runners = {}
  for name, norm in (('flax', nnx.GroupNorm), ('dots', _GroupNormDots),
                     ('affine only', _AffineOnly)):
    with mock.patch.object(nnx, 'GroupNorm', norm):
      config = ddpm_mnist.get_config('cond')
      family = DiffusionFamily(config)
      family.setup_data(0, 1)
      batches = [family.train_batch(i) for i in range(4)]
      runners[name] = benchmark_peers.genlab_train_runner(config, family, batches)[0]
  times = {name: [] for name in runners}
  for _ in range(rounds):
    for name, run in runners.items():
      times[name].append(1e3 * run(5))
  return [[f'UNet train step, GroupNorms as {name}',
           f'{statistics.median(t):.1f} ms/step (chunks: {", ".join(f"{v:.0f}" for v in t)})']
          for name, t in times.items()]


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
        lambda p, x: group_norm_dots(x, *p, 8, flax_norm.epsilon), p, x)[1](g))
    # The candidate must compute what flax's does before its time means anything.
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
