"""Transformer parts shared by the decoder-only (GPT), encoder-only (BERT) and encoder-decoder
families, in Flax NNX.

Conventions:
  * The residual stream is 2-D, `[batch * seq, embed]`, and every matmul runs on 2-D operands;
    only attention sees 4-D `[batch, seq, heads, head_dim]`. On XLA:CPU dense layers on 3-D
    activations backpropagate ~2x slower than on 2-D ones; on TPU/GPU the reshapes are free.
    So modules take `batch` and `seq` (static ints) beside `x`.
  * A mask is boolean, True = may attend, broadcastable to `[batch, heads, q_len, k_len]`;
    `causal_mask`, `padding_mask` and `combine_masks` build them. `is_causal=True` is the
    causal mask given as a flag, which lets cuDNN skip the masked half.
  * Fused projections are head-major: the qkv kernel's columns are `[heads, 3, head_dim]`, a
    cross-attention's kv kernel's `[heads, 2, head_dim]`. Splitting those columns into contiguous
    blocks over a tensor-parallel mesh axis gives each device whole heads (Megatron), with no
    resharding of activations.
  * Dropout takes explicit PRNG keys (None = off), so a jitted step can fold its key from the
    step number and stay reproducible; `nnx.Rngs` is used for init only.
  * A KV cache is a dict `{'k', 'v'}` of `[batch, cache_len, heads, head_dim]` arrays
    (`init_kv_cache`); decoding writes one position per step. Cross-attention keys/values of a
    fixed context (the encoder output) are computed once with `MultiHeadAttention.context_kv`.
  * `dtype` is the activation (and KV cache) dtype, `param_dtype` the parameter dtype; attention
    scores, softmax and tied logits are float32.

Public API (shapes; B batch, S/T sequence lengths, D embed, H heads, Dh head_dim, V vocab):
  dropout(x, rate, key, bits=32)                      inverted dropout, identity if key is None
  check_dropout_bits(bits) -> bits                    ValueError unless bits is 8, 16 or 32
  gelu(x), gelu_tanh(x)                               exact (erf) GELU; tanh approximation
  causal_mask(q_len, k_len=None) -> [1, 1, T, S]      query i sees keys <= i
  padding_mask(valid [B, S]) -> [B, 1, 1, S]          keys that are real tokens
  combine_masks(*masks) -> mask or None               logical and, Nones skipped
  attention_implementation(implementation, dropout)   'einsum' | 'xla' | 'cudnn' (the choice)
  dot_product_attention(q, k, v, mask, ...)           q [B,T,H,Dh], k/v [B,S,H,Dh] -> [B,T,H,Dh]
  init_kv_cache(batch, length, heads, head_dim, dtype) -> {'k', 'v'}
  MultiHeadAttention(cross=False)                     self attention: __call__, prefill, decode
  MultiHeadAttention(cross=True)                      cross attention: context_kv, __call__
  MLP(activation='gelu'|'gelu_tanh')                  [N, D] -> [N, D], 4x GELU
  Block(cross_attention=False|True, mlp_dim=None, activation='gelu')   pre-LN block: __call__,
                                                      prefill, decode
  Embeddings                                          token + learned position embeddings, tied
  embed_tokens(wte, wpe, tokens, positions), tied_logits(h, wte)   the same as functions
  sinusoidal_positions(positions [...], dim) -> [..., dim]           fixed (Vaswani) positions
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

#: {'k': [batch, cache_len, heads, head_dim], 'v': same}
KVCache = dict[str, jax.Array]

IMPLEMENTATIONS = (None, 'einsum', 'xla', 'cudnn')

# Masked scores: the most negative float32 rather than -inf, so that a row with no visible key
# (e.g. a padding query over padding keys) gives a finite uniform softmax instead of NaN; a row
# with one visible key gets exactly the -inf result (exp underflows to 0).
_MASKED = float(jnp.finfo(jnp.float32).min)


# ------------------------------------------------------------------------------ functions


DROPOUT_BITS = (8, 16, 32)


def check_dropout_bits(bits: int) -> int:
  """`bits` if it is a width `dropout` draws (`DROPOUT_BITS`), else ValueError."""
  if bits not in DROPOUT_BITS:
    raise ValueError(f'dropout_bits={bits!r}: must be one of {DROPOUT_BITS}')
  return bits


def dropout(x: jax.Array, rate: float, key: jax.Array | None, bits: int = 32) -> jax.Array:
  """Inverted dropout; identity when `key` is None or `rate` is 0.

  `bits` is the width of the random number drawn per element. 32: `jax.random.bernoulli`, one
  threefry evaluation per element. 8 or 16: each 32-bit word of `jax.random.bits` is cut into
  32 // bits numbers, so the mask costs 4x or 2x fewer evaluations (on XLA:CPU threefry is
  a visible share of a training step: experiments/README.md's diffusion speed section), and the
  rate is rounded to a multiple of 2 ** -bits (0.1 -> 26 / 256 = 0.1016 at 8 bits); the kept
  elements are scaled by the exact inverse of the kept fraction, so E[output] = x either way.
  Another `bits` draws another mask from the same key.
  """
  check_dropout_bits(bits)
  if key is None or rate == 0.0:
    return x
  if bits == 32:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
  levels = 2 ** bits
  dropped = round(rate * levels)     # numbers below this drop their element
  if dropped == 0:
    return x
  if dropped >= levels:
    raise ValueError(f'dropout rate {rate} rounds to 1 at {bits} bits')
  per_word = 32 // bits
  words = jax.random.bits(key, (-(-x.size // per_word),), jnp.uint32)
  u = jax.lax.bitcast_convert_type(words, jnp.uint8 if bits == 8 else jnp.uint16)
  u = u.reshape(-1)[:x.size].reshape(x.shape)
  return jnp.where(u >= dropped, x * (levels / (levels - dropped)), jnp.zeros_like(x))


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as torch's nn.GELU().

  Same function as `jax.nn.gelu(x, approximate=False)` (max grad difference 2e-7), but that one
  is written with erfc, whose derivative costs ~2x more on XLA:CPU.
  """
  return 0.5 * x * (1.0 + lax.erf(x * (1.0 / math.sqrt(2.0))))


def gelu_tanh(x: jax.Array) -> jax.Array:
  """GELU's tanh approximation (Hendrycks & Gimpel 2016, section 2), which GPT-2 uses
  (transformers' "gelu_new"): 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
  return jax.nn.gelu(x, approximate=True)


#: The MLP activations by name ('gelu' is the default of every model).
ACTIVATIONS = {'gelu': gelu, 'gelu_tanh': gelu_tanh}


def causal_mask(q_len: int, k_len: int | None = None) -> jax.Array:
  """`[1, 1, q_len, k_len]` bool: query i may attend to keys 0..i (aligned at the start)."""
  k_len = q_len if k_len is None else k_len
  return jnp.tril(jnp.ones((q_len, k_len), bool))[None, None]


def padding_mask(valid: jax.Array) -> jax.Array:
  """valid `[batch, k_len]` bool (True = real token) -> `[batch, 1, 1, k_len]` key mask.

  Queries at padding positions still attend to the real keys; their outputs are meaningless and
  losses must ignore them, but they never leak into real positions.
  """
  return valid[:, None, None, :]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
  """Logical and of the masks that are not None (broadcasting); None when all are None."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  return functools.reduce(jnp.logical_and, masks)


def attention_implementation(implementation: str | None, dropout_active: bool,
                             backend: str | None = None) -> str:
  """Which attention kernel runs: 'einsum', 'xla' or 'cudnn'.

  None (auto) is einsum on CPU, where its gradient took 0.65 ms against 1.24 ms for
  `jax.nn.dot_product_attention` at [12, 64, 4, 32], and whenever attention dropout is active
  (that function has none); elsewhere XLA's fused attention ('xla'). cuDNN flash attention
  (GPU, bf16/fp16, SM80+) is only used when asked for, as `implementation='cudnn'`.

  Raises:
    ValueError: unknown implementation, or a fused one asked for with attention dropout.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'attention implementation {implementation!r}: use one of '
                     f'{", ".join(map(str, IMPLEMENTATIONS))}')
  if implementation is None:
    backend = jax.default_backend() if backend is None else backend
    return 'einsum' if backend == 'cpu' or dropout_active else 'xla'
  if implementation != 'einsum' and dropout_active:
    raise ValueError(f'attention implementation {implementation!r} has no attention dropout: '
                     'use None or einsum, or dropout 0')
  return implementation


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None, *, is_causal: bool = False,
                          dropout_rate: float = 0.0, dropout_key: jax.Array | None = None,
                          implementation: str | None = None, dropout_bits: int = 32
                          ) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim) + masked) v, per head.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k, v: `[batch, k_len, heads, head_dim]`.
    mask: bool, True = may attend, broadcastable to `[batch, heads, q_len, k_len]`; None: all.
    is_causal: also apply `causal_mask(q_len, k_len)`.
    dropout_rate, dropout_key: dropout on the attention probabilities (key None: off).
    dropout_bits: their masks' random bits per element (`dropout`).
    implementation: see `attention_implementation`.

  Returns:
    `[batch, q_len, heads, head_dim]` in v's dtype.
  """
  dropout_active = dropout_key is not None and dropout_rate > 0.0
  impl = attention_implementation(implementation, dropout_active)
  if impl != 'einsum':
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                        implementation=impl)
  head_dim = q.shape[-1]
  # Scores and softmax in float32 also under bf16 activations.
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  scores = scores * (1.0 / math.sqrt(head_dim))
  mask = combine_masks(mask, causal_mask(q.shape[1], k.shape[1]) if is_causal else None)
  if mask is not None:
    scores = jnp.where(mask, scores, _MASKED)
  probs = dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, dropout_key, dropout_bits)
  probs = probs.astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


def init_kv_cache(batch: int, length: int, num_heads: int, head_dim: int,
                  dtype: Any = jnp.float32) -> KVCache:
  """Zero KV cache: k, v `[batch, length, heads, head_dim]`."""
  shape = (batch, length, num_heads, head_dim)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


def embed_tokens(wte: nnx.Embed, wpe: nnx.Embed, tokens: jax.Array,
                 positions: jax.Array) -> jax.Array:
  """Token + position embedding: tokens `[...]`, positions broadcastable -> `[..., embed]`."""
  table = embedding_table(wpe)
  if wpe.dtype is not None:
    table = table.astype(wpe.dtype)
  return wte(tokens) + table[positions]


def sinusoidal_positions(positions: jax.Array, dim: int) -> jax.Array:
  """Fixed position encodings (Vaswani et al. 2017, section 3.5): positions `[...]` int ->
  `[..., dim]` float32, sin(p / 10000^(2i/dim)) at feature 2i, cos at 2i + 1."""
  if dim % 2:
    raise ValueError(f'sinusoidal positions need an even width, got {dim}')
  i = jnp.arange(dim // 2, dtype=jnp.float32)
  angles = positions[..., None].astype(jnp.float32) / (10000.0 ** (2.0 * i / dim))
  return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(
      positions.shape + (dim,))


def embedding_table(embed: nnx.Embed) -> jax.Array:
  """An Embed's table `[rows, D]`, with its LoRA update where it has one
  (`models.lora.LoRAEmbed`): every read of a table by index goes through here."""
  table = getattr(embed, 'table', None)
  return table() if callable(table) else embed.embedding[...]


def tied_logits(h: jax.Array, wte: nnx.Embed) -> jax.Array:
  """h `[n, embed]` -> float32 logits `[n, vocab]` = h @ wte.T (the output layer is the input
  embedding), without materialising the transpose."""
  table = embedding_table(wte).astype(h.dtype)
  return lax.dot_general(h, table, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


# -------------------------------------------------------------------------------- modules


class MultiHeadAttention(nnx.Module):
  """Multi-head attention with head-major fused projections.

  Self attention (`cross=False`): params `qkv` `[D, 3D]`, `proj` `[D, D]`. Cross attention
  (`cross=True`): params `q` `[D, D]`, `kv` `[context_dim, 2D]`, `proj`; the keys/values come
  from a context (the encoder output) through `context_kv`, computed once per context.
  """

  def __init__(self, *, embed_dim: int, num_heads: int, cross: bool = False,
               dropout: float = 0.0, init_std: float, out_init_std: float | None = None,
               implementation: str | None = None, context_dim: int | None = None,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
               dropout_bits: int = 32):
    """init_std: std of the input projections; out_init_std: of `proj` (default init_std);
    context_dim: width of a cross-attention context (default embed_dim), e.g. a text encoder's
    beside a UNet level's channels."""
    if embed_dim % num_heads:
      raise ValueError(f'embed_dim {embed_dim} not divisible by num_heads {num_heads}')
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f'attention implementation {implementation!r}: use one of '
                       f'{", ".join(map(str, IMPLEMENTATIONS))}')
    self.num_heads = num_heads
    self.head_dim = embed_dim // num_heads
    self.cross = cross
    self.dropout, self.dropout_bits = dropout, check_dropout_bits(dropout_bits)
    self.implementation = implementation
    self.dtype = dtype
    linear = functools.partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    init = nnx.initializers.normal(init_std)
    out_init = nnx.initializers.normal(init_std if out_init_std is None else out_init_std)
    if cross:
      self.q = linear(embed_dim, embed_dim, kernel_init=init)
      self.kv = linear(context_dim or embed_dim, 2 * embed_dim, kernel_init=init)
    else:
      self.qkv = linear(embed_dim, 3 * embed_dim, kernel_init=init)
    self.proj = linear(embed_dim, embed_dim, kernel_init=out_init)

  def _heads(self, y: jax.Array, batch: int, seq: int, n: int) -> list[jax.Array]:
    """`[batch * seq, n * embed]` head-major -> n arrays `[batch, seq, heads, head_dim]`."""
    y = y.reshape(batch, seq, self.num_heads, n, self.head_dim)
    return [y[:, :, :, i] for i in range(n)]

  def _qkv(self, x, batch, seq):
    if self.cross:
      raise ValueError('a cross-attention layer has no own keys/values: pass context_kv')
    return self._heads(self.qkv(x), batch, seq, 3)

  def context_kv(self, context: jax.Array, *, batch: int, seq: int) -> KVCache:
    """Cross attention: context `[batch * seq, context_dim]` -> k, v `[batch, seq, heads,
    head_dim]`."""
    if not self.cross:
      raise ValueError('context_kv is for cross attention (cross=True)')
    k, v = self._heads(self.kv(context), batch, seq, 2)
    return {'k': k, 'v': v}

  def _output(self, y: jax.Array, key: jax.Array | None) -> jax.Array:
    """`[batch, seq, heads, head_dim]` -> projected `[batch * seq, embed]` (+ dropout)."""
    y = y.reshape(y.shape[0] * y.shape[1], -1)
    return dropout(self.proj(y), self.dropout, key, self.dropout_bits)

  def _attend(self, x, batch, seq, mask, is_causal, context_kv, keys):
    if context_kv is None:
      q, k, v = self._qkv(x, batch, seq)
    else:
      if not self.cross:
        raise ValueError('context_kv given to a self-attention layer')
      q = self.q(x).reshape(batch, seq, self.num_heads, self.head_dim)
      k, v = context_kv['k'], context_kv['v']
    y = dot_product_attention(q, k, v, mask, is_causal=is_causal, dropout_rate=self.dropout,
                              dropout_key=keys[0], implementation=self.implementation,
                              dropout_bits=self.dropout_bits)
    return self._output(y, keys[1]), k, v

  def __call__(self, x: jax.Array, *, batch: int, seq: int, mask: jax.Array | None = None,
               is_causal: bool = False, context_kv: KVCache | None = None,
               dropout_keys: tuple[jax.Array | None, jax.Array | None] = (None, None)
               ) -> jax.Array:
    """Attention over a whole sequence (training, encoding, prefill without a cache).

    Args:
      x: `[batch * seq, embed]`, the (layer-normed) queries' input.
      batch, seq: static sizes.
      mask: bool, broadcastable to `[batch, heads, seq, k_len]` (k_len = seq for self
        attention, the context length for cross attention).
      is_causal: add the causal mask (self attention).
      context_kv: cross attention only: `context_kv(...)` of the context (required).
      dropout_keys: (attention probabilities, output) dropout keys; None = off.

    Returns:
      `[batch * seq, embed]`.
    """
    if self.cross and context_kv is None:
      raise ValueError('cross attention needs context_kv (see MultiHeadAttention.context_kv)')
    return self._attend(x, batch, seq, mask, is_causal, context_kv, dropout_keys)[0]

  def prefill(self, x: jax.Array, *, batch: int, seq: int, cache: KVCache,
              mask: jax.Array | None = None, is_causal: bool = True
              ) -> tuple[jax.Array, KVCache]:
    """Self attention over positions [0, seq) that also writes their k, v into `cache`.

    Cache entries at positions >= seq are left as they were; `decode` masks them out.
    Returns (`[batch * seq, embed]`, cache).
    """
    y, k, v = self._attend(x, batch, seq, mask, is_causal, None, (None, None))
    cache = {'k': lax.dynamic_update_slice_in_dim(cache['k'], k.astype(cache['k'].dtype), 0, 1),
             'v': lax.dynamic_update_slice_in_dim(cache['v'], v.astype(cache['v'].dtype), 0, 1)}
    return y, cache

  def decode(self, x: jax.Array, pos: jax.Array, cache: KVCache, *,
             mask: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Self attention of one new position to cached positions [0, pos] (causal decoding).

    Args:
      x: `[batch, embed]`, the (layer-normed) input at position `pos`.
      pos: int32 scalar (may be traced), the position written in the cache.
      cache: k, v `[batch, cache_len, heads, head_dim]` holding positions [0, pos).
      mask: extra bool key mask broadcastable to `[batch, heads, 1, cache_len]` (e.g. a
        left-padded prompt's padding); positions > pos are always masked (stale entries).

    Returns:
      (`[batch, embed]`, cache with position `pos` written).
    """
    batch = x.shape[0]
    q, k, v = self._qkv(x, batch, 1)
    zero = jnp.zeros((), jnp.int32)
    index = (zero, jnp.asarray(pos, jnp.int32), zero, zero)
    k_cache = lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype), index)
    v_cache = lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype), index)
    # One query: scores [batch, heads, cache_len], no q axis (the cheapest form on CPU).
    scores = jnp.einsum('bhd,bthd->bht', q[:, 0], k_cache, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(self.head_dim))
    valid = jnp.arange(k_cache.shape[1]) <= pos
    if mask is not None:
      valid = jnp.logical_and(valid, mask[:, :, 0, :])  # [batch | 1, heads | 1, cache_len]
    scores = jnp.where(valid, scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    y = jnp.einsum('bht,bthd->bhd', probs, v_cache).reshape(batch, -1)
    return self.proj(y), {'k': k_cache, 'v': v_cache}


class MLP(nnx.Module):
  """Position-wise `[tokens, embed] -> [tokens, embed]`: fc (4x wider by default), GELU (exact,
  or `activation='gelu_tanh'`), proj."""

  def __init__(self, *, embed_dim: int, dropout: float = 0.0, init_std: float,
               out_init_std: float | None = None, hidden_dim: int | None = None,
               activation: str = 'gelu', dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs, dropout_bits: int = 32):
    if activation not in ACTIVATIONS:
      raise ValueError(f'activation {activation!r}: use one of {", ".join(ACTIVATIONS)}')
    self.dropout, self.dropout_bits = dropout, check_dropout_bits(dropout_bits)
    self.activation = activation
    hidden_dim = 4 * embed_dim if hidden_dim is None else hidden_dim
    out_init_std = init_std if out_init_std is None else out_init_std
    self.fc = nnx.Linear(embed_dim, hidden_dim, kernel_init=nnx.initializers.normal(init_std),
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.proj = nnx.Linear(hidden_dim, embed_dim,
                           kernel_init=nnx.initializers.normal(out_init_std),
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """x `[tokens, embed]`; key: dropout key on the output (None = off)."""
    return dropout(self.proj(ACTIVATIONS[self.activation](self.fc(x))), self.dropout, key,
                   self.dropout_bits)


class Block(nnx.Module):
  """Pre-LayerNorm transformer block on the 2-D residual stream:

    x = x + attn(ln1(x))                      self attention (mask / causal)
    x = x + cross_attn(ln_cross(x), context)  decoders only (cross_attention=True)
    x = x + mlp(ln2(x))

  Params: ln1, attn (qkv, proj), [ln_cross, cross_attn (q, kv, proj)], ln2, mlp (fc, proj).
  `out_init_std` is the init std of the projections into the residual stream (GPT-2 scales it
  by 1 / sqrt(2 * num_layers)).
  """

  def __init__(self, *, embed_dim: int, num_heads: int, dropout: float = 0.0,
               init_std: float, out_init_std: float | None = None,
               cross_attention: bool = False, mlp_dim: int | None = None,
               activation: str = 'gelu', implementation: str | None = None,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
               dropout_bits: int = 32):
    """mlp_dim: the MLP's hidden width (default 4 * embed_dim); activation: the MLP's ('gelu'
    exact, 'gelu_tanh' GPT-2's); dropout_bits: random bits per dropout mask element
    (`dropout`)."""
    ln = functools.partial(nnx.LayerNorm, embed_dim, epsilon=1e-5, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
    attn = functools.partial(MultiHeadAttention, embed_dim=embed_dim, num_heads=num_heads,
                             dropout=dropout, init_std=init_std, out_init_std=out_init_std,
                             implementation=implementation, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs, dropout_bits=dropout_bits)
    self.has_cross = cross_attention
    # Creation order fixes which init key each param gets: keep ln1, attn, ln2, mlp first.
    self.ln1 = ln()
    self.attn = attn()
    self.ln2 = ln()
    self.mlp = MLP(embed_dim=embed_dim, dropout=dropout, init_std=init_std,
                   out_init_std=out_init_std, hidden_dim=mlp_dim, activation=activation,
                   dtype=dtype, param_dtype=param_dtype, rngs=rngs, dropout_bits=dropout_bits)
    if cross_attention:
      self.ln_cross = ln()
      self.cross_attn = attn(cross=True)

  def context_kv(self, context: jax.Array, *, batch: int, seq: int) -> KVCache:
    """Cross-attention keys/values of context `[batch * seq, embed]` (decoder blocks)."""
    return self.cross_attn.context_kv(context, batch=batch, seq=seq)

  def _cross(self, x, batch, seq, context_kv, context_mask, keys):
    if not self.has_cross:
      if context_kv is not None:
        raise ValueError('context_kv given to a block without cross attention')
      return x
    if context_kv is None:
      raise ValueError('a block with cross attention needs context_kv')
    return x + self.cross_attn(self.ln_cross(x), batch=batch, seq=seq, mask=context_mask,
                               context_kv=context_kv, dropout_keys=keys)

  def __call__(self, x: jax.Array, *, batch: int, seq: int, mask: jax.Array | None = None,
               is_causal: bool = False, context_kv: KVCache | None = None,
               context_mask: jax.Array | None = None,
               dropout_key: jax.Array | None = None) -> jax.Array:
    """x `[batch * seq, embed]` -> `[batch * seq, embed]`.

    mask / is_causal: self-attention mask (see MultiHeadAttention); context_kv: this block's
    `context_kv(encoder output)`; context_mask: cross-attention key mask broadcastable to
    `[batch, heads, seq, context_len]` (the context's padding); dropout_key: None = off.
    """
    n = 5 if self.has_cross else 3
    keys = (None,) * n if dropout_key is None else tuple(jax.random.split(dropout_key, n))
    x = x + self.attn(self.ln1(x), batch=batch, seq=seq, mask=mask, is_causal=is_causal,
                      dropout_keys=keys[:2])
    x = self._cross(x, batch, seq, context_kv, context_mask, keys[3:5])
    return x + self.mlp(self.ln2(x), keys[2])

  def prefill(self, x: jax.Array, *, batch: int, seq: int, cache: KVCache,
              mask: jax.Array | None = None, is_causal: bool = True,
              context_kv: KVCache | None = None, context_mask: jax.Array | None = None
              ) -> tuple[jax.Array, KVCache]:
    """As `__call__` (no dropout), also writing positions [0, seq) into the self-attention
    cache. Returns (x, cache)."""
    y, cache = self.attn.prefill(self.ln1(x), batch=batch, seq=seq, cache=cache, mask=mask,
                                 is_causal=is_causal)
    x = self._cross(x + y, batch, seq, context_kv, context_mask, (None, None))
    return x + self.mlp(self.ln2(x)), cache

  def decode(self, x: jax.Array, pos: jax.Array, cache: KVCache, *,
             mask: jax.Array | None = None, context_kv: KVCache | None = None,
             context_mask: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """One position: x `[batch, embed]` at `pos` -> (x, cache with `pos` written).

    context_mask broadcastable to `[batch, heads, 1, context_len]`.
    """
    y, cache = self.attn.decode(self.ln1(x), pos, cache, mask=mask)
    x = self._cross(x + y, x.shape[0], 1, context_kv, context_mask, (None, None))
    return x + self.mlp(self.ln2(x)), cache


class Embeddings(nnx.Module):
  """Token + learned position embeddings (params `wte` `[vocab, D]`, `wpe` `[max_len, D]`),
  with the output layer tied to `wte` (`logits`)."""

  def __init__(self, *, vocab_size: int, max_len: int, embed_dim: int, init_std: float,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    init = nnx.initializers.normal(init_std)
    self.max_len = max_len
    self.wte = nnx.Embed(vocab_size, embed_dim, embedding_init=init, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
    self.wpe = nnx.Embed(max_len, embed_dim, embedding_init=init, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """tokens `[batch, seq]` -> `[batch * seq, embed]`; positions default to 0..seq-1.

    Raises ValueError when seq > max_len (positions past the table).
    """
    batch, seq = tokens.shape
    if positions is None:
      if seq > self.max_len:
        raise ValueError(f'sequence length {seq} > max_len {self.max_len}')
      positions = jnp.arange(seq)[None, :]
    return embed_tokens(self.wte, self.wpe, tokens, positions).reshape(batch * seq, -1)

  def logits(self, h: jax.Array) -> jax.Array:
    """h `[n, embed]` -> float32 logits `[n, vocab]` (tied to `wte`)."""
    return tied_logits(h, self.wte)
