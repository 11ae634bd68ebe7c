"""Inception-v3 as used for FID (pytorch-fid's `FIDInceptionV3`), in Flax NNX, up to pool3.

The architecture is the TensorFlow FID graph (inception-2015-12-05) as pytorch-fid ports it:
torchvision's Inception-v3 with the FID patches (average pools that ignore padding; max pool in
the last block). Attribute names follow pytorch-fid's state_dict, so its weights load with
`load_torch_npz` from an .npz of that state_dict:

  python -c "import torch, numpy as np; sd = torch.load('pt_inception-2015-12-05-6726825d.pth');
             np.savez('inception_fid.npz', **{k: v.numpy() for k, v in sd.items()})"

tests/test_inception_torch.py (the `interop` extra) rebuilds pytorch-fid's network from torch.nn
layers, gives it random weights and BatchNorm statistics, saves its state_dict this way and checks
that these features match its within 1e-4 (relative to their largest). The published weights
themselves are not used in this project (no network access).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx



def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
  """conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU; torch-style padding."""

  def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0, *, rngs: nnx.Rngs):
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(cin, cout, _pair(kernel), _pair(stride), padding=((ph, ph), (pw, pw)),
                         use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=1e-3, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
  """3x3 stride-1 average pool ignoring the zero padding (TensorFlow's, the FID patch)."""
  return nnx.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride=2, padding=0):
  return nnx.max_pool(x, (3, 3), (stride, stride), ((padding, padding), (padding, padding)))


class InceptionA(nnx.Module):
  def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(_avg_pool_3x3(x))], -1)


class InceptionB(nnx.Module):
  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        _max_pool_3x3(x)], -1)


class InceptionC(nnx.Module):
  def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    dbl = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      dbl = layer(dbl)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
        dbl,
        self.branch_pool(_avg_pool_3x3(x))], -1)


class InceptionD(nnx.Module):
  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b7 = x
    for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                  self.branch7x7x3_4):
      b7 = layer(b7)
    return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), b7, _max_pool_3x3(x)], -1)


class InceptionE(nnx.Module):
  """`max_pool`: the FID graph's last block pools with a 3x3 max (pytorch-fid FIDInceptionE_2)."""

  def __init__(self, cin: int, *, max_pool: bool, rngs: nnx.Rngs):
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = _max_pool_3x3(x, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(b3), self.branch3x3_2b(b3),
        self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
        self.branch_pool(pooled)], -1)


class InceptionV3(nnx.Module):
  """[batch, H, W, 1 or 3] images in [-1, 1] -> [batch, 2048] pool3 features (FID's)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, max_pool=False, rngs=rngs)
    self.Mixed_7c = InceptionE(2048, max_pool=True, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    # torch's bilinear interpolate(align_corners=False) upsampling (half-pixel centres).
    x = jax.image.resize(x, (x.shape[0], 299, 299, 3), 'bilinear', antialias=False)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max_pool_3x3(x)))
    x = _max_pool_3x3(x)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    return x.mean((1, 2))


# NNX variable name -> (torch state_dict suffix, array conversion torch -> NNX).
_TORCH_NAMES = {
    'kernel': ('weight', lambda w: w.transpose(2, 3, 1, 0)),  # [o, i, kh, kw] -> [kh, kw, i, o]
    'scale': ('weight', lambda w: w), 'bias': ('bias', lambda w: w),
    'mean': ('running_mean', lambda w: w), 'var': ('running_var', lambda w: w)}


def torch_key(path: tuple[str, ...]) -> str:
  """('Mixed_5b', 'branch1x1', 'conv', 'kernel') -> 'Mixed_5b.branch1x1.conv.weight'."""
  return '.'.join(path[:-1] + (_TORCH_NAMES[path[-1]][0],))


def nnx_path(tree_path) -> tuple[str, ...]:
  """A `tree_map_with_path` path into an `nnx.State` -> its module/variable names."""
  return tuple(str(k.key) for k in tree_path if isinstance(k, jax.tree_util.DictKey))


def load_torch_npz(model: InceptionV3, path: str) -> InceptionV3:
  """Loads pytorch-fid's Inception state_dict, saved as an .npz, into `model` (in place).

  Raises ValueError naming the file when a weight is missing or has the wrong shape. Keys the
  features do not use (the 1008-way `fc`, `num_batches_tracked`) are ignored.
  """
  try:
    arrays = np.load(path)  # lazy: each array is read when looked up
  except (OSError, ValueError) as e:
    raise ValueError(f'--inception_weights={path}: cannot read it as .npz ({e})') from None

  def load(tree_path, leaf):
    name = nnx_path(tree_path)
    key = torch_key(name)
    if key not in arrays:
      raise ValueError(f'--inception_weights={path}: no {key!r}; expected pytorch-fid\'s '
                      'pt_inception-2015-12-05 state_dict saved with np.savez')
    value = _TORCH_NAMES[name[-1]][1](arrays[key])
    if value.shape != leaf.shape:
      raise ValueError(f'--inception_weights={path}: {key!r} has shape {arrays[key].shape}, '
                      f'expected (torch layout of) {leaf.shape}')
    return jnp.asarray(value, leaf.dtype)

  with arrays:
    nnx.update(model, jax.tree_util.tree_map_with_path(load, nnx.state(model)))
  return model
