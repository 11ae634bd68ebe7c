"""The DDPM UNet (Ho et al. 2020, appendix B) in Flax NNX, with optional class or text conditioning.

Layout: conv in -> per resolution level, `num_res_blocks` residual blocks (GroupNorm, SiLU, 3x3
conv, time embedding added, GroupNorm, SiLU, dropout, 3x3 conv) with self-attention at the
resolutions in `attention_resolutions`, then a stride-2 conv (down) -> middle (res, attention,
res) -> the mirror image with the skip connections concatenated and nearest-neighbour 2x
upsampling -> GroupNorm, SiLU, conv out. The time t goes in through a sinusoidal embedding and an
MLP; a class label (id num_classes is the null class of classifier-free guidance) adds a learned
embedding to it. The last conv of every residual branch and of the output starts at zero, so
each block starts as the identity (as improved-diffusion's `zero_module`).

Text conditioning (`context_dim` > 0, as latent diffusion's UNet, Rombach et al. 2022): a
context of token vectors [B, L, context_dim] with its padding mask [B, L] (a text encoder's
output) is read by a residual cross-attention block after every self-attention (the resolutions
in `attention_resolutions` and the middle), and its mean over the real tokens is added to the
time embedding (as Imagen's pooled text embedding, Saharia et al. 2022). A context with no real
token (the null caption of classifier-free guidance) contributes exactly nothing to either.
Without a context dimension the UNet and its params are the class-conditional/unconditional ones.

Images are NHWC. 28x28 MNIST with channel_mult (1, 2, 2) runs at 28, 14 and 7 pixels.

Every GroupNorm is flax's `nnx.GroupNorm` (the same params and formula); with
`group_norm_sums='dot'` its sums over the positions are batched dots instead of XLA reductions
(`group_norm_dots`), which XLA:CPU runs faster (2-3x for a GroupNorm alone, on one CPU:
experiments/README.md). The two share their params and differ by float rounding only, so a
trained model can sample with either (`with_group_norm_sums`).
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from models import layers
from models import upsample

_zeros = nnx.initializers.zeros

GROUP_NORM_SUMS = ('reduce', 'dot')


def _position_sums(*arrays):
  """Per-(image, channel) sums over the positions of `[N, S, C]` arrays, each as a batched
  `[1, S] @ [S, C]` dot: XLA:CPU hands these to YNNPACK, where a reduce over S is a loop of
  XLA's own, slower."""
  ones = jnp.ones((arrays[0].shape[0], 1, arrays[0].shape[1]), jnp.float32)
  return [jnp.matmul(ones, a)[:, 0, :] for a in arrays]


def _group_mean(v, groups: int, count: int):
  """[N, C] per-channel sums -> [N, C]: each channel gets its group's sum / count."""
  n, c = v.shape
  return jnp.repeat(v.reshape(n, groups, c // groups).sum(-1), c // groups, axis=1) / count


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm_dots(x, scale, bias, groups: int, eps: float = 1e-6):
  """GroupNorm of NHWC `x` with flax's formula (variance as E[x^2] - E[x]^2, clipped at 0, as
  `use_fast_variance`), every sum over the positions a batched dot (`_position_sums`): in the
  forward (sums of x and x^2) and in a hand-written backward (sums of dy and dy * x). The
  normalisation and dx are each one elementwise pass with per-(image, channel) coefficients.
  The output's dtype is that of x, scale and bias promoted together, as flax's."""
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
  return y.astype(jnp.result_type(x, scale, bias)), (x, scale, mean, inv_std)


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
  dx = (g.reshape(x.shape) * k_dy[:, None, None, :] + flat.reshape(x.shape) * k_x[:, None, None, :]
        + k_0[:, None, None, :])
  return (dx.astype(x.dtype), sum_dy_xhat.sum(0).astype(scale.dtype),
          sum_dy.sum(0).astype(scale.dtype))


group_norm_dots.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nnx.GroupNorm):
  """`nnx.GroupNorm` (the same params) whose sums over the positions are XLA reductions
  (`sums='reduce'`: flax's own code) or batched dots (`sums='dot'`: `group_norm_dots`)."""

  def __init__(self, num_features: int, *, num_groups: int, sums: str = 'reduce',
               rngs: nnx.Rngs):
    if sums not in GROUP_NORM_SUMS:
      raise ValueError(f'group_norm_sums={sums!r}: must be one of {GROUP_NORM_SUMS}')
    super().__init__(num_features, num_groups=num_groups, rngs=rngs)
    self.sums = sums

  def __call__(self, x, *, mask=None):
    if self.sums == 'reduce' or mask is not None:
      return super().__call__(x, mask=mask)
    return group_norm_dots(x, self.scale[...], self.bias[...], self.num_groups, self.epsilon)


def with_group_norm_sums(model: nnx.Module, sums: str) -> nnx.Module:
  """`model` with every `GroupNorm` in it summing by `sums`: a new module over the same param
  arrays (the two forms have the same params); `model` itself is left as it was."""
  if sums not in GROUP_NORM_SUMS:
    raise ValueError(f'group_norm_sums={sums!r}: must be one of {GROUP_NORM_SUMS}')
  copy = nnx.merge(*nnx.split(model))
  for _, node in nnx.iter_graph(copy):
    if isinstance(node, GroupNorm):
      node.sums = sums
  return copy


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [B, dim] of timesteps t [B] (Transformer positions; DDPM's choice)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class ResBlock(nnx.Module):
  def __init__(self, in_ch: int, out_ch: int, emb_dim: int, *, dropout: float, groups: int,
               dtype, rngs: nnx.Rngs, dropout_bits: int = 32, norm_sums: str = 'reduce'):
    self.norm1 = GroupNorm(in_ch, num_groups=groups, sums=norm_sums, rngs=rngs)
    self.conv1 = nnx.Conv(in_ch, out_ch, (3, 3), dtype=dtype, rngs=rngs)
    self.emb = nnx.Linear(emb_dim, out_ch, dtype=dtype, rngs=rngs)
    self.norm2 = GroupNorm(out_ch, num_groups=groups, sums=norm_sums, rngs=rngs)
    self.conv2 = nnx.Conv(out_ch, out_ch, (3, 3), dtype=dtype, kernel_init=_zeros, rngs=rngs)
    self.skip = nnx.Conv(in_ch, out_ch, (1, 1), dtype=dtype, rngs=rngs) if in_ch != out_ch else None
    self.dropout, self.dropout_bits = dropout, dropout_bits

  def __call__(self, x, emb, key):
    """x [B, H, W, in_ch], emb [B, emb_dim] (already SiLU'd) -> [B, H, W, out_ch]."""
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = h + self.emb(emb)[:, None, None, :]
    h = layers.dropout(nnx.silu(self.norm2(h)), self.dropout, key, self.dropout_bits)
    h = self.conv2(h)
    return (x if self.skip is None else self.skip(x)) + h


class Attention(nnx.Module):
  """Single-head self-attention over the H*W positions, residual."""

  def __init__(self, ch: int, *, groups: int, dtype, rngs: nnx.Rngs, norm_sums: str = 'reduce'):
    self.norm = GroupNorm(ch, num_groups=groups, sums=norm_sums, rngs=rngs)
    self.qkv = nnx.Linear(ch, 3 * ch, dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(ch, ch, dtype=dtype, kernel_init=_zeros, rngs=rngs)

  def __call__(self, x):
    b, h, w, c = x.shape
    # 2-D matmuls [B*H*W, C]: XLA:CPU backpropagates them ~2x faster than 3-D ones.
    qkv = self.qkv(self.norm(x).reshape(b * h * w, c)).reshape(b, h * w, 3, c)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = jnp.einsum('bqc,bkc->bqk', q, k) / math.sqrt(c)
    y = jnp.einsum('bqk,bkc->bqc', jax.nn.softmax(scores.astype(jnp.float32), -1).astype(v.dtype), v)
    return x + self.proj(y.reshape(b * h * w, c)).reshape(b, h, w, c)


class CrossAttention(nnx.Module):
  """Residual multi-head attention from the H*W image positions to a context's tokens."""

  def __init__(self, ch: int, context_dim: int, *, heads: int, groups: int, dtype,
               rngs: nnx.Rngs, norm_sums: str = 'reduce'):
    self.norm = GroupNorm(ch, num_groups=groups, sums=norm_sums, rngs=rngs)
    # Output projection at zero: the block starts as the identity, like every residual branch.
    self.attn = layers.MultiHeadAttention(
        embed_dim=ch, num_heads=heads, cross=True, context_dim=context_dim,
        init_std=ch ** -0.5, out_init_std=0.0, dtype=dtype, rngs=rngs)

  def __call__(self, x, context, context_mask):
    """x [B, H, W, C], context [B, L, D], context_mask [B, L] bool -> [B, H, W, C]."""
    b, h, w, c = x.shape
    length = context.shape[1]
    kv = self.attn.context_kv(context.reshape(b * length, -1).astype(x.dtype), batch=b,
                              seq=length)
    y = self.attn(self.norm(x).reshape(b * h * w, c), batch=b, seq=h * w,
                  mask=layers.padding_mask(context_mask), context_kv=kv)
    # A context without real tokens (the null caption) adds nothing; masked softmax alone would
    # attend uniformly to its padding.
    has_tokens = jnp.any(context_mask, axis=-1)[:, None, None, None]
    return x + jnp.where(has_tokens, y.reshape(b, h, w, c), 0).astype(x.dtype)


class UNet(nnx.Module):
  """eps/x0/v network of a diffusion model: (x_t [B, H, W, C], t [B], labels [B] | None) ->
  [B, H, W, C] float32.

  Args:
    image_shape: (H, W, C); H and W must be divisible by 2 ** (len(channel_mult) - 1).
    channels: width of the first level; level i has channels * channel_mult[i].
    channel_mult: one entry per resolution level.
    num_res_blocks: residual blocks per level (the up path has one more, as DDPM).
    attention_resolutions: the side lengths (in pixels) at which blocks get self-attention.
    dropout: dropout rate inside residual blocks (training only).
    dropout_bits: 32 (`jax.random.bernoulli`'s masks), or 16 or 8: cheaper masks from packed
      random bits, the rate rounded to a multiple of 2 ** -bits (`models.layers.dropout`).
    num_classes: 0 for an unconditional model; else labels in [0, num_classes], where
      num_classes is the null label (classifier-free guidance).
    groups: GroupNorm groups.
    group_norm_sums: 'reduce' (flax's GroupNorm) or 'dot' (its sums over the positions as
      batched dots: faster on XLA:CPU, equal up to float rounding; `GroupNorm`).
    context_dim: 0 (no text); else the width of the context `__call__` takes, read by
      cross-attention with `context_heads` heads wherever there is self-attention.
  """

  def __init__(self, *, image_shape: tuple[int, int, int], channels: int = 32,
               channel_mult: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 1,
               attention_resolutions: tuple[int, ...] = (7,), dropout: float = 0.0,
               dropout_bits: int = 32, num_classes: int = 0, groups: int = 8, context_dim: int = 0,
               context_heads: int = 4, group_norm_sums: str = 'reduce', dtype=jnp.float32,
               rngs: nnx.Rngs):
    size, _, in_ch = image_shape
    if size % 2 ** (len(channel_mult) - 1) or image_shape[1] % 2 ** (len(channel_mult) - 1):
      raise ValueError(f'image_shape {image_shape} is not divisible by 2^{len(channel_mult) - 1}')
    self.channels, self.num_classes, self.dtype = channels, num_classes, dtype
    self.context_dim = context_dim
    if context_dim:
      bad = [channels * m for m in channel_mult if (channels * m) % context_heads]
      if bad:
        raise ValueError(f'context_heads={context_heads} does not divide the channel count '
                         f'{bad[0]}')
    emb_dim = 4 * channels
    self.time_mlp1 = nnx.Linear(channels, emb_dim, rngs=rngs)
    self.time_mlp2 = nnx.Linear(emb_dim, emb_dim, rngs=rngs)
    self.label_emb = nnx.Embed(num_classes + 1, emb_dim, rngs=rngs) if num_classes else None
    # No bias: the null caption's mean token is zero, and so is its contribution.
    self.context_emb = (nnx.Linear(context_dim, emb_dim, use_bias=False, rngs=rngs)
                        if context_dim else None)
    self.conv_in = nnx.Conv(in_ch, channels, (3, 3), dtype=dtype, rngs=rngs)
    layers.check_dropout_bits(dropout_bits)
    sums = group_norm_sums
    block = lambda i, o: ResBlock(i, o, emb_dim, dropout=dropout, groups=groups, dtype=dtype,
                                  rngs=rngs, dropout_bits=dropout_bits, norm_sums=sums)
    attn = lambda c, res: (Attention(c, groups=groups, dtype=dtype, rngs=rngs, norm_sums=sums)
                           if res in attention_resolutions else None)
    # Created only for a text model, so other models draw the same init keys as before.
    cross = lambda c, res: (CrossAttention(c, context_dim, heads=context_heads, groups=groups,
                                           dtype=dtype, rngs=rngs, norm_sums=sums)
                            if context_dim and res in attention_resolutions else None)

    # Down: a list of (ResBlock, Attention | None, CrossAttention | None) or (Conv stride 2,
    # None, None); skip widths. (Cross-attention comes last in every list, so the param paths of
    # models without it are those of the UNet before it existed.)
    self.down = nnx.List()
    skips, ch, res = [channels], channels, size
    for level, mult in enumerate(channel_mult):
      for _ in range(num_res_blocks):
        self.down.append(nnx.List([block(ch, channels * mult), attn(channels * mult, res),
                                   cross(channels * mult, res)]))
        ch = channels * mult
        skips.append(ch)
      if level < len(channel_mult) - 1:
        self.down.append(nnx.List([nnx.Conv(ch, ch, (3, 3), strides=2, dtype=dtype, rngs=rngs),
                                   None, None]))
        skips.append(ch)
        res //= 2
    self.mid1, self.mid2 = block(ch, ch), block(ch, ch)
    self.mid_attn = Attention(ch, groups=groups, dtype=dtype, rngs=rngs, norm_sums=sums)
    self.mid_cross = (CrossAttention(ch, context_dim, heads=context_heads, groups=groups,
                                     dtype=dtype, rngs=rngs, norm_sums=sums)
                      if context_dim else None)
    # Up: (ResBlock, Attention | None, Conv after 2x upsampling | None, CrossAttention | None).
    self.up = nnx.List()
    for level, mult in reversed(list(enumerate(channel_mult))):
      for i in range(num_res_blocks + 1):
        up = (nnx.Conv(channels * mult, channels * mult, (3, 3), dtype=dtype, rngs=rngs)
              if level > 0 and i == num_res_blocks else None)
        self.up.append(nnx.List([block(ch + skips.pop(), channels * mult),
                                 attn(channels * mult, res), up, cross(channels * mult, res)]))
        ch = channels * mult
      res *= 2 if level > 0 else 1
    self.norm_out = GroupNorm(ch, num_groups=groups, sums=sums, rngs=rngs)
    self.conv_out = nnx.Conv(ch, in_ch, (3, 3), dtype=dtype, kernel_init=_zeros, rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array | None = None, *,
               context: jax.Array | None = None, context_mask: jax.Array | None = None,
               dropout_key: jax.Array | None = None) -> jax.Array:
    """context [B, L, context_dim] and context_mask [B, L] (True: a real token): a text
    model's condition, required when context_dim > 0 (all False: the null caption)."""
    if self.context_dim and (context is None or context_mask is None):
      raise ValueError('a UNet with context_dim > 0 needs context and context_mask')
    if not self.context_dim and context is not None:
      raise ValueError('context given to a UNet without cross-attention (context_dim=0)')
    emb = self.time_mlp2(nnx.silu(self.time_mlp1(timestep_embedding(t, self.channels))))
    if self.label_emb is not None:
      if labels is None:
        labels = jnp.full(t.shape, self.num_classes, jnp.int32)
      emb = emb + self.label_emb(labels)
    cross = lambda layer, h: h
    if self.context_dim:
      valid = context_mask.astype(jnp.float32)[..., None]   # [B, L, 1]
      pooled = (context.astype(jnp.float32) * valid).sum(1) / jnp.maximum(valid.sum(1), 1.0)
      emb = emb + self.context_emb(pooled)
      cross = lambda layer, h: h if layer is None else layer(h, context, context_mask)
    emb = nnx.silu(emb).astype(self.dtype)
    counter = itertools.count()   # one dropout key per residual block
    key = lambda: None if dropout_key is None else jax.random.fold_in(dropout_key, next(counter))

    h = self.conv_in(x.astype(self.dtype))
    hs = [h]
    for layer, attn, cross_attn in self.down:
      h = layer(h, emb, key()) if isinstance(layer, ResBlock) else layer(h)
      if attn is not None:
        h = attn(h)
      h = cross(cross_attn, h)
      hs.append(h)
    h = cross(self.mid_cross, self.mid_attn(self.mid1(h, emb, key())))
    h = self.mid2(h, emb, key())
    for layer, attn, up, cross_attn in self.up:
      h = layer(jnp.concatenate([h, hs.pop()], axis=-1), emb, key())
      if attn is not None:
        h = attn(h)
      h = cross(cross_attn, h)
      if up is not None:
        h = up(upsample.upsample_nearest(h))
    return self.conv_out(nnx.silu(self.norm_out(h))).astype(jnp.float32)
