"""Decoder-only transformer (nanoGPT architecture) in Flax NNX, with KV-cache sampling.

Architecture (as nanoGPT): token + learned position embeddings, dropout, pre-LayerNorm
blocks (causal multi-head self-attention, 4x GELU MLP), final LayerNorm, output
projection tied to the token embedding. Init as nanoGPT, normal(std) weights and
normal(std / sqrt(2 * num_layers)) for the two residual projections of each block,
zero biases.
but std defaults to 1 / sqrt(embed_dim) (`init_std=None`) rather than GPT-2's fixed 0.02,
which was chosen for width 768: at nanoGPT's CPU width of 128 (std 0.088) the
Shakespeare val loss after 2000 steps drops from ~1.87 to ~1.70 (experiments/README.md).
Pass init_std=0.02 for nanoGPT's exact init.

The blocks, attention and embeddings are `models.layers` (shared with the BERT and
encoder-decoder families); see there for the 2-D residual stream (`[batch * seq, embed]`,
faster on XLA:CPU), the head-major fused qkv columns (tensor parallelism splits whole heads)
and the attention kernel choice (`attention_implementation`: None picks einsum on CPU, XLA's
fused attention elsewhere; 'cudnn' asks for cuDNN flash attention on GPU).

Mixed precision: `dtype` is the activation (and KV cache) dtype, `param_dtype` the
parameter dtype. Logits are always float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from models import layers

# A KV cache: one {'k': ..., 'v': ...} dict per layer, each [batch, block_size, heads, head_dim].
KVCache = tuple[dict[str, jax.Array], ...]

# top_p_filter counts a set of tokens as reaching mass p when it falls short of p by
# less than this (float32 rounding of softmax and cumsum; see top_p_filter).
_TOP_P_TOLERANCE = 1e-6


class GPT(nnx.Module):
  """nanoGPT-style decoder-only transformer with tied input/output embeddings.

  Params: wte `[vocab, D]`, wpe `[block_size, D]`, blocks/i (`layers.Block`: ln1,
  attn/qkv, attn/proj, ln2, mlp/fc, mlp/proj), ln_f; with prompt tuning (Lester et al. 2021,
  "The Power of Scale for Parameter-Efficient Prompt Tuning") also prompt `[P, D]`: P learned
  input vectors that sit at positions [0, P) before every sequence (plus their position
  embeddings), so tokens start at position P and `context_size` = block_size - P.
  """

  def __init__(self, *, vocab_size: int, block_size: int, num_layers: int, num_heads: int,
               embed_dim: int, dropout: float = 0.0, init_std: float | None = None,
               attention_implementation: str | None = None, activation: str = 'gelu',
               prompt_tokens: int = 0, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs, dropout_bits: int = 32):
    """init_std: std of the weight and embedding init (residual projections get
    init_std / sqrt(2 * num_layers)); None is 1 / sqrt(embed_dim), 0.02 is nanoGPT's.
    attention_implementation: see `layers.attention_implementation`.
    activation: the MLP's GELU, 'gelu' (exact, nanoGPT's) or 'gelu_tanh' (GPT-2's).
    prompt_tokens: P soft-prompt vectors before every sequence (0: none).
    dropout_bits: random bits per dropout mask element (`layers.dropout`; 32: bernoulli)."""
    if embed_dim % num_heads:
      raise ValueError(f'embed_dim {embed_dim} not divisible by num_heads {num_heads}')
    if not 0 <= prompt_tokens < block_size:
      raise ValueError(f'prompt_tokens {prompt_tokens} must be in [0, block_size {block_size})')
    self.vocab_size = vocab_size
    self.block_size = block_size
    self.num_layers = num_layers
    self.num_heads = num_heads
    self.embed_dim = embed_dim
    self.dropout, self.dropout_bits = dropout, dropout_bits
    self.dtype = dtype
    self.prompt_tokens = prompt_tokens
    init_std = embed_dim ** -0.5 if init_std is None else init_std
    init = nnx.initializers.normal(init_std)
    # wte/wpe directly on the model (not a layers.Embeddings) keeps the param tree of runs
    # written before models/layers.py existed, so their checkpoints still restore.
    self.wte = nnx.Embed(vocab_size, embed_dim, embedding_init=init, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
    self.wpe = nnx.Embed(block_size, embed_dim, embedding_init=init, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
    self.blocks = nnx.List([
        layers.Block(embed_dim=embed_dim, num_heads=num_heads, dropout=dropout,
                     init_std=init_std, out_init_std=init_std / math.sqrt(2 * num_layers),
                     activation=activation, implementation=attention_implementation,
                     dtype=dtype, param_dtype=param_dtype, rngs=rngs, dropout_bits=dropout_bits)
        for _ in range(num_layers)])
    self.ln_f = nnx.LayerNorm(embed_dim, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)
    if prompt_tokens:
      # Drawn like the token embeddings, so the soft prompt starts at their scale.
      self.prompt = nnx.Param(init(rngs.params(), (prompt_tokens, embed_dim), param_dtype))

  @property
  def context_size(self) -> int:
    """How many tokens fit: block_size less the soft prompt's positions."""
    return self.block_size - self.prompt_tokens

  def _logits(self, h: jax.Array) -> jax.Array:
    """h `[n, embed]` (pre final LayerNorm) -> float32 logits `[n, vocab]` (tied to wte)."""
    return layers.tied_logits(self.ln_f(h), self.wte)

  def _embed(self, tokens: jax.Array) -> jax.Array:
    """tokens `[batch, seq]` -> `[batch * (P + seq), embed]`: the soft prompt at positions
    [0, P), the tokens at [P, P + seq)."""
    batch, seq = tokens.shape
    p = self.prompt_tokens
    if seq > self.context_size:
      raise ValueError(f'sequence length {seq} > block_size {self.block_size}'
                       + (f' less {p} prompt vectors' if p else ''))
    x = layers.embed_tokens(self.wte, self.wpe, tokens, p + jnp.arange(seq)[None, :])
    if p:
      positions = layers.embedding_table(self.wpe)[:p].astype(x.dtype)
      soft = self.prompt[...].astype(x.dtype) + positions
      x = jnp.concatenate([jnp.broadcast_to(soft, (batch, p, self.embed_dim)), x], axis=1)
    return x.reshape(batch * (p + seq), self.embed_dim)

  def _drop_prompt(self, h: jax.Array, batch: int) -> jax.Array:
    """`[batch * (P + seq), embed]` -> `[batch * seq, embed]`: the tokens' rows."""
    if not self.prompt_tokens:
      return h
    return h.reshape(batch, -1, self.embed_dim)[:, self.prompt_tokens:].reshape(
        -1, self.embed_dim)

  def _trunk(self, tokens: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """tokens `[batch, seq]` -> h `[batch * seq, embed]` (before the final LayerNorm)."""
    batch, seq = tokens.shape
    keys = ([None] * (self.num_layers + 1) if dropout_key is None
            else list(jax.random.split(dropout_key, self.num_layers + 1)))
    x = layers.dropout(self._embed(tokens), self.dropout, keys[0], self.dropout_bits)
    for block, key in zip(self.blocks, keys[1:]):
      x = block(x, batch=batch, seq=self.prompt_tokens + seq, is_causal=True, dropout_key=key)
    return self._drop_prompt(x, batch)

  def __call__(self, tokens: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """Full forward pass.

    Args:
      tokens: `[batch, seq]` int32, seq <= context_size.
      dropout_key: PRNG key for dropout; None is deterministic (eval).

    Returns:
      float32 logits `[batch, seq, vocab]`.
    """
    batch, seq = tokens.shape
    return self._logits(self._trunk(tokens, dropout_key)).reshape(batch, seq, self.vocab_size)

  def init_cache(self, batch_size: int) -> KVCache:
    """Zero KV cache: per layer k, v `[batch, block_size, heads, head_dim]` in `dtype`."""
    return tuple(layers.init_kv_cache(batch_size, self.block_size, self.num_heads,
                                      self.embed_dim // self.num_heads, self.dtype)
                 for _ in range(self.num_layers))

  def prefill(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Runs tokens `[batch, seq]` at token positions [0, seq) (after the soft prompt, which
    is written too), writing them into the cache.

    Returns:
      (float32 logits `[batch, seq, vocab]`, cache). Cache entries at positions >= P + seq
      are left as they were; decode masks them out.
    """
    batch, seq = tokens.shape
    x = self._embed(tokens)
    new_cache = []
    for block, c in zip(self.blocks, cache):
      x, c = block.prefill(x, batch=batch, seq=self.prompt_tokens + seq, cache=c)
      new_cache.append(c)
    x = self._drop_prompt(x, batch)
    return self._logits(x).reshape(batch, seq, self.vocab_size), tuple(new_cache)

  def decode(self, token: jax.Array, pos: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One decoding step.

    Args:
      token: `[batch]` int32, the token at position `pos`.
      pos: int32 scalar token position (may be traced), 0 < pos < context_size.
      cache: KV cache holding token positions [0, pos) (and the soft prompt: a prefill
        wrote them).

    Returns:
      (float32 logits `[batch, vocab]` for the next token, cache with `pos` written).
    """
    pos = jnp.asarray(pos, jnp.int32) + self.prompt_tokens
    x = layers.embed_tokens(self.wte, self.wpe, token, pos)
    new_cache = []
    for block, c in zip(self.blocks, cache):
      x, c = block.decode(x, pos, c)
      new_cache.append(c)
    return self._logits(x), tuple(new_cache)

  def logits_at(self, tokens: jax.Array, index: jax.Array) -> jax.Array:
    """tokens `[batch, seq]` -> float32 logits `[batch, vocab]` at position `index` only."""
    batch, seq = tokens.shape
    h = self._trunk(tokens)
    h = lax.dynamic_index_in_dim(h.reshape(batch, seq, -1), index, axis=1, keepdims=False)
    return self._logits(h)


# ----------------------------------------------------------------------------------------
# Sampling.


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Keeps exactly the `k` largest logits along the last axis, sets the rest to -inf.

  Ties at the threshold go to the lower index (as `lax.top_k`): exactly min(k, vocab)
  entries are kept, whatever the ties.

  Args:
    logits: `[..., vocab]`.
    k: static int >= 1; k >= vocab keeps everything.

  Returns:
    `[..., vocab]`, same dtype.
  """
  if k < 1:
    raise ValueError(f'top_k must be >= 1, got {k}')
  if k >= logits.shape[-1]:
    return logits
  _, idx = lax.top_k(logits, k)
  keep = jnp.put_along_axis(jnp.zeros(logits.shape, bool), idx, True, axis=-1, inplace=False)
  return jnp.where(keep, logits, -jnp.inf)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """Nucleus filter: keeps the smallest set of most probable tokens with mass >= p.

  Tokens are ranked by probability (ties toward the lower index, stable sort); the token
  at rank r is kept iff the mass of ranks < r is below p, so the kept set is the
  shortest prefix whose mass reaches p, and the top-1 token is always kept. A prefix
  whose mass falls short of p by less than 1e-6 counts as reaching it, so that float32
  rounding of softmax/cumsum does not add a token when the mass equals p exactly
  (probs [0.5, 0.3, 0.15, 0.05]: p=0.8 keeps 2 tokens, p=0.81 keeps 3).

  Args:
    logits: `[..., vocab]`.
    p: static float in (0, 1]; p >= 1 keeps every token of nonzero probability.

  Returns:
    `[..., vocab]` float32 with the dropped entries at -inf.
  """
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  order = jnp.argsort(-probs, axis=-1, stable=True)
  sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep_sorted = mass_before < p - _TOP_P_TOLERANCE
  keep_sorted = keep_sorted.at[..., 0].set(True)
  keep = jnp.put_along_axis(jnp.zeros(logits.shape, bool), order, keep_sorted, axis=-1,
                            inplace=False)
  return jnp.where(keep, logits, -jnp.inf)


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None) -> jax.Array:
  """Samples token ids from logits `[..., vocab]` -> `[...]` int32.

  Order as HF/nanoGPT: divide by temperature, then top-k, then top-p. temperature 0 is
  greedy argmax (ties toward the lower index) and ignores top_k/top_p and the key.
  `temperature` may be a Python number or a traced scalar.
  """
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if isinstance(temperature, (int, float)) and temperature == 0:
    return greedy
  safe_t = jnp.where(jnp.asarray(temperature) == 0, 1.0, temperature)
  logits = logits / safe_t
  if top_k is not None:
    logits = top_k_filter(logits, top_k)
  if top_p is not None:
    logits = top_p_filter(logits, top_p)
  sampled = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
  return jnp.where(jnp.asarray(temperature) == 0, greedy, sampled)


_STATIC = ('max_new_tokens', 'temperature', 'top_k', 'top_p')


@functools.partial(jax.jit, static_argnums=0, static_argnames=_STATIC)
def _generate_cached(graphdef, state, prompt, key, *, max_new_tokens, temperature, top_k,
                     top_p):
  """See `generate`."""
  model = nnx.merge(graphdef, state)
  block = model.context_size
  prompt = prompt[:, -block:].astype(jnp.int32)
  batch, prompt_len = prompt.shape
  half = max(1, block // 2)
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
  keys = jax.random.split(key, max_new_tokens)
  logits, cache = model.prefill(prompt, model.init_cache(batch))
  first = sample(logits[:, -1], keys[0])
  if max_new_tokens == 1:
    return first[:, None]
  # Tokens currently in cache positions [0, pos); needed to re-prefill when full.
  window = jnp.zeros((batch, block), jnp.int32).at[:, :prompt_len].set(prompt)

  def step(carry, step_key):
    cache, window, pos, token = carry

    def decode(cache, window):
      logits, cache = model.decode(token, pos, cache)
      window = lax.dynamic_update_slice_in_dim(window, token[:, None], pos, axis=1)
      return logits, cache, window, pos + 1

    def reprefill(cache, window):
      # Window full: restart it from the last `half` tokens of the context.
      context = jnp.concatenate([window[:, block - half + 1:], token[:, None]], axis=1)
      logits, cache = model.prefill(context, cache)
      window = lax.dynamic_update_slice_in_dim(jnp.zeros_like(window), context, 0, axis=1)
      return logits[:, -1], cache, window, jnp.int32(half)

    logits, cache, window, pos = lax.cond(pos < block, decode, reprefill, cache, window)
    token = sample(logits, step_key)
    return (cache, window, pos, token), token

  _, rest = lax.scan(step, (cache, window, jnp.int32(prompt_len), first), keys[1:])
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(model: GPT, prompt: jax.Array, key: jax.Array, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None) -> jax.Array:
  """Autoregressive sampling with a KV cache, one jitted call.

  A prefill fills the cache with the prompt (cropped to its last block_size tokens),
  then a `lax.scan` decodes one token per step. When the cache is full the context
  slides: the last block_size // 2 tokens are re-prefilled at positions [0, bs // 2)
  and decoding resumes, so the cost is one prefill per ~block_size/2 tokens instead of a
  full recompute per token.

  Equivalence with `generate_full_recompute` (nanoGPT's generate): with the same key
  the emitted tokens are identical while prompt_len + tokens so far <= block_size, i.e.
  the first block_size - prompt_len + 1 tokens. Past that nanoGPT conditions each token
  on the last block_size tokens, this function on the last block_size//2 .. block_size
  tokens (the window restarts at half size), so the tokens differ.

  Args:
    model: the GPT (dropout is off).
    prompt: `[batch, prompt_len]` int32, prompt_len >= 1.
    key: PRNG key; token i uses `jax.random.split(key, max_new_tokens)[i]`.
    max_new_tokens, temperature, top_k, top_p: static; see `sample_logits`.

  Returns:
    `[batch, max_new_tokens]` int32.
  """
  if max_new_tokens == 0:
    return jnp.zeros((prompt.shape[0], 0), jnp.int32)
  graphdef, state = nnx.split(model)
  return _generate_cached(graphdef, state, prompt, key, max_new_tokens=max_new_tokens,
                          temperature=float(temperature), top_k=top_k, top_p=top_p)


@functools.partial(jax.jit, static_argnums=0, static_argnames=_STATIC)
def _generate_full(graphdef, state, prompt, key, *, max_new_tokens, temperature, top_k,
                   top_p):
  """See `generate_full_recompute`."""
  model = nnx.merge(graphdef, state)
  block = model.context_size
  prompt = prompt[:, -block:].astype(jnp.int32)
  batch, prompt_len = prompt.shape
  # Fixed-size buffer so the loop body compiles once; causality makes the padding after
  # position n - 1 irrelevant to the logits at n - 1.
  buf = jnp.zeros((batch, block), jnp.int32).at[:, :prompt_len].set(prompt)

  def step(carry, step_key):
    buf, n = carry
    logits = model.logits_at(buf, n - 1)
    token = sample_logits(logits, step_key, temperature, top_k, top_p)
    appended = lax.dynamic_update_slice_in_dim(buf, token[:, None], jnp.minimum(n, block - 1),
                                               axis=1)
    shifted = jnp.concatenate([buf[:, 1:], token[:, None]], axis=1)
    buf = jnp.where(n < block, appended, shifted)
    return (buf, jnp.minimum(n + 1, block)), token

  keys = jax.random.split(key, max_new_tokens)
  _, tokens = lax.scan(step, (buf, jnp.int32(prompt_len)), keys)
  return tokens.T


def generate_full_recompute(model: GPT, prompt: jax.Array, key: jax.Array, *,
                            max_new_tokens: int, temperature: float = 1.0,
                            top_k: int | None = None, top_p: float | None = None) -> jax.Array:
  """nanoGPT's generate: a full forward over the last block_size tokens per new token.

  Baseline for benchmarks and tests; same arguments, key use and output as `generate`.
  """
  if max_new_tokens == 0:
    return jnp.zeros((prompt.shape[0], 0), jnp.int32)
  graphdef, state = nnx.split(model)
  return _generate_full(graphdef, state, prompt, key, max_new_tokens=max_new_tokens,
                        temperature=float(temperature), top_k=top_k, top_p=top_p)


@functools.partial(jax.jit, static_argnums=0, static_argnames=('max_new_tokens', 'temperature'))
def _continue(graphdef, state, prompts, lengths, keys, *, max_new_tokens, temperature):
  """See `greedy_continue` and `sample_continue`."""
  model = nnx.merge(graphdef, state)
  batch, width = prompts.shape
  total = width + max_new_tokens
  padded = jnp.zeros((batch, total), jnp.int32).at[:, :width].set(prompts)
  logits, cache = model.prefill(padded[:, :1], model.init_cache(batch))
  # Row i's token at position p draws from fold_in(keys[i], p): a pure function of the row's
  # key and prompt, whatever else the batch holds.
  choose = lambda logits, pos: jax.vmap(
      lambda row, key: sample_logits(row, jax.random.fold_in(key, pos), temperature))(
          logits, keys)

  def step(carry, pos):
    cache, logits = carry
    # Position `pos` holds the prompt's token while there is one, else the model's choice.
    token = jnp.where(pos < lengths, padded[:, pos], choose(logits[:, -1], pos))
    token = token.astype(jnp.int32)
    logits, cache = model.decode(token, pos, cache)
    return (cache, logits[:, None]), token

  (_, last), tokens = lax.scan(step, (cache, logits), jnp.arange(1, total))
  # tokens: positions [1, total); plus the choice after the last position.
  seq = jnp.concatenate([padded[:, :1], tokens.T, choose(last[:, -1], total)[:, None]], 1)
  index = lengths[:, None] + jnp.arange(max_new_tokens)[None, :]
  return jnp.take_along_axis(seq, index, axis=1)


def greedy_continue(model: GPT, prompts: jax.Array, lengths: jax.Array, *,
                    max_new_tokens: int) -> jax.Array:
  """Greedy continuations of prompts of different lengths, in one batch and one compile.

  Row i's prompt is `prompts[i, :lengths[i]]` (right-padded to a shared width). Every row
  steps through positions with the KV cache: a position takes the prompt's token while the
  row has one and the greedy choice after, so no row waits on padding and no attention mask is
  needed. The emitted tokens equal `generate(model, prompts[i:i+1, :lengths[i]], ...,
  temperature=0)` row by row (tests/test_gpt.py).

  Args:
    model: the GPT (dropout off).
    prompts: `[batch, width]` int32, width + max_new_tokens <= model.context_size.
    lengths: `[batch]` int32 in [1, width].
    max_new_tokens: static.

  Returns:
    `[batch, max_new_tokens]` int32: each row's tokens after its prompt.
  """
  if prompts.shape[1] + max_new_tokens > model.context_size:
    raise ValueError(f'prompt width {prompts.shape[1]} + {max_new_tokens} new tokens > '
                     f'{model.context_size} positions')
  graphdef, state = nnx.split(model)
  return _continue(graphdef, state, jnp.asarray(prompts, jnp.int32),
                   jnp.asarray(lengths, jnp.int32), jax.random.split(jax.random.key(0),
                                                                     prompts.shape[0]),
                   max_new_tokens=max_new_tokens, temperature=0.0)


def sample_continue(model: GPT, prompts: jax.Array, lengths: jax.Array, keys: jax.Array, *,
                    max_new_tokens: int, temperature: float = 1.0) -> jax.Array:
  """`greedy_continue` with sampling at `temperature` (0: greedy), one jitted call.

  keys: `[batch]` PRNG keys, one per row. Row i's token at position p draws from
  `jax.random.fold_in(keys[i], p)` (through `sample_logits`), so a row's continuation is a
  pure function of (its key, its prompt) whatever else is in the batch.

  Returns:
    `[batch, max_new_tokens]` int32.
  """
  if prompts.shape[1] + max_new_tokens > model.context_size:
    raise ValueError(f'prompt width {prompts.shape[1]} + {max_new_tokens} new tokens > '
                     f'{model.context_size} positions')
  graphdef, state = nnx.split(model)
  return _continue(graphdef, state, jnp.asarray(prompts, jnp.int32),
                   jnp.asarray(lengths, jnp.int32), keys, max_new_tokens=max_new_tokens,
                   temperature=float(temperature))


# ----------------------------------------------------------------------------------------
# Size and FLOPs.


def num_params(model: GPT, include_embeddings: bool = True) -> int:
  """Number of parameters (the tied token embedding counted once).

  include_embeddings=False follows nanoGPT's `get_num_params(non_embedding=True)`: it
  drops the position embedding only. The token embedding stays because it is also the
  output projection, whose matmul is real compute; this is the N that `flops_per_token`
  expects.
  """
  total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  if not include_embeddings:
    total -= model.wpe.embedding[...].size
  return int(total)


def flops_per_token(num_params_non_embedding: int, num_layers: int, block_size: int,
                    embed_dim: int) -> int:
  """Training FLOPs per token (forward + backward), nanoGPT's / PaLM's estimate.

  6 * N + 12 * L * T * d, with N = `num_params(model, include_embeddings=False)` (all
  params minus the position embedding, as nanoGPT's estimate_mfu), and the second term
  the attention score/value matmuls at full context T. Multiply by batch * block_size
  tokens for a train step.
  """
  return 6 * num_params_non_embedding + 12 * num_layers * block_size * embed_dim
