"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as model surgery.

`apply_lora` replaces chosen `nnx.Linear` modules of an already built model with `LoRALinear`:
the same kernel and bias Variables (so their param paths, e.g. 'blocks/0/attn/qkv/kernel', do
not change and a base checkpoint loads into them), plus Flax's own `nnx.LoRA` adapter under
'.../lora/lora_a' `[in, rank]` and '.../lora/lora_b' `[rank, out]` (`nnx.LoRAParam`s). The
output is y = x W + b + (alpha / rank) x A B (the paper's section 4.1 scaling); B starts at zero,
so the adapted model starts as exactly the base model. `merge_lora` folds the adapters back:
W <- W + (alpha / rank) A B, giving plain `nnx.Linear`s with the base model's param tree.

An `nnx.Embed` that `targets` matches (e.g. a GPT's token table, 'model/wte') becomes a
`LoRAEmbed`: its table E `[vocab, D]` reads as E + (alpha / rank) A B with A `[vocab, rank]`
and B `[rank, D]`, in the lookup and, where the model ties its output layer to the table
(`models.layers.tied_logits`), in the logits too. As in the `peft` library's embedding LoRA,
A (one rank-sized row per token) starts at zero and B is random, so here the zero factor is A;
B is drawn from N(0, 1 / D) (peft: N(0, 1)), so each of its rows has about unit norm and the
update's size does not grow with the width. Its rank can differ from the Linears'
(`embed_rank`): a table has far more rows than a projection, so the same rank costs far more
params. Modules read a table through `models.layers.embedding_table`, which sees the update.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"; `dora=True`) splits the
adapted kernel V = W + (alpha / rank) A B into a direction V / ||V|| and a learned magnitude
per output column (the norm over the input axis): W' = m * V / ||V||. Here m = g * ||W||, with
a learned gain g '.../lora/lora_magnitude' `[out]` that starts at one (the paper starts m at
||W||): W is frozen, so this is the same set of kernels, but it starts at the base model
whatever order the base weights and the adapters are loaded in (a run's adapters are made
before `init_from` loads its base). With B at zero, V = W and the layer is the base layer
exactly. The gradient flows through ||V|| too (the paper's section 4.3 detaches it to save
memory; these layers are small). Only Linears take it; an Embed target keeps plain LoRA.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx


def _adopt(module: nnx.Module, base: nnx.Module) -> None:
  """Gives `module` the base's Variables and settings (no new weight is drawn)."""
  for name, value in vars(base).items():
    if not name.startswith('_'):
      setattr(module, name, value)


class LoRALinear(nnx.Linear):
  """An `nnx.Linear` that adopts a base Linear's Variables and adds a scaled `nnx.LoRA`."""

  def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs,
               dora: bool = False):
    if not 1 <= rank <= min(base.in_features, base.out_features):
      raise ValueError(f'LoRA rank {rank} must be in [1, min(in, out) = '
                       f'{min(base.in_features, base.out_features)}] for a Linear '
                       f'{base.in_features} -> {base.out_features}')
    _adopt(self, base)   # the base's kernel, bias and settings as they are
    self.scale = float(alpha) / rank
    self.lora = nnx.LoRA(base.in_features, rank, base.out_features, dtype=base.dtype,
                         param_dtype=base.param_dtype, rngs=rngs)
    self.dora = bool(dora)
    if self.dora:   # DoRA's gain g on the base's column norms (the module docstring)
      self.lora.lora_magnitude = nnx.LoRAParam(jnp.ones((base.out_features,),
                                                        base.param_dtype))

  def _column_factor(self) -> jax.Array:
    """DoRA: g * ||W|| / ||V|| `[out]` (float32), V = W + scale * A B; W' = V * factor."""
    kernel = self.kernel[...].astype(jnp.float32)
    adapted = kernel + self.scale * (self.lora.lora_a[...].astype(jnp.float32)
                                     @ self.lora.lora_b[...].astype(jnp.float32))
    base, now = (jnp.sum(jnp.square(w), axis=0) for w in (kernel, adapted))
    gain = self.lora.lora_magnitude[...].astype(jnp.float32)
    # One square root of the ratio: exactly 1 where V = W (two roots divided need not be). A
    # column that is all zeros (e.g. pruned) in W and V keeps the ratio 1, and its gradient
    # finite; a column zero in W but not in V stays zero (its magnitude is g * 0).
    nonzero = now > 0
    ratio = jnp.where(nonzero, base / jnp.where(nonzero, now, 1.0), 1.0)
    return gain * jnp.sqrt(ratio)

  def __call__(self, inputs, out_sharding=None):
    """inputs `[..., in]` -> `[..., out]`."""
    if not self.dora:
      return (super().__call__(inputs, out_sharding=out_sharding)
              + self.scale * self.lora(inputs))
    # x W' + b = (x W + scale x A B) * factor + b: the kernel is never rebuilt per call.
    y = (self._linear(inputs, out_sharding) + self.scale * self.lora(inputs))
    y = y * self._column_factor().astype(y.dtype)
    if self.bias is not None:
      y += jnp.reshape(self.bias[...].astype(y.dtype), (1,) * (y.ndim - 1) + (-1,))
    return y

  def _linear(self, inputs, out_sharding):
    """x W without the bias, computed as nnx.Linear.__call__ computes x W + b."""
    inputs, kernel = self.promote_dtype((inputs, self.kernel[...]), dtype=self.dtype)
    kwargs = {'out_sharding': out_sharding}
    if self.preferred_element_type is not None:
      kwargs['preferred_element_type'] = self.preferred_element_type
    return self.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                            precision=self.precision, **kwargs)

  def merged(self) -> nnx.Linear:
    """A plain Linear whose kernel is W + scale * A B (DoRA: times its column factor; float32
    products, param dtype kept)."""
    linear = nnx.Linear(self.in_features, self.out_features, use_bias=self.use_bias,
                        dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                        dot_general=self.dot_general, promote_dtype=self.promote_dtype,
                        preferred_element_type=self.preferred_element_type,
                        rngs=nnx.Rngs(0))
    delta = self.lora.lora_a[...].astype(jnp.float32) @ self.lora.lora_b[...].astype(jnp.float32)
    kernel = self.kernel[...]
    adapted = kernel.astype(jnp.float32) + self.scale * delta
    if self.dora:
      adapted = adapted * self._column_factor()
    linear.kernel = nnx.Param(adapted.astype(kernel.dtype))
    linear.bias = self.bias
    return linear


class LoRAEmbed(nnx.Embed):
  """An `nnx.Embed` that adopts a base Embed's table and adds a scaled low-rank update A B."""

  def __init__(self, base: nnx.Embed, *, rank: int, alpha: float, rngs: nnx.Rngs):
    if not 1 <= rank <= min(base.num_embeddings, base.features):
      raise ValueError(f'LoRA rank {rank} must be in [1, min(rows, features) = '
                       f'{min(base.num_embeddings, base.features)}] for an Embed '
                       f'{base.num_embeddings} x {base.features}')
    _adopt(self, base)   # the base's table and settings as they are
    self.scale = float(alpha) / rank
    self.lora = nnx.LoRA(base.num_embeddings, rank, base.features, dtype=base.dtype,
                         param_dtype=base.param_dtype, a_initializer=nnx.initializers.zeros,
                         b_initializer=nnx.initializers.normal(base.features ** -0.5),
                         rngs=rngs)

  def delta(self) -> jax.Array:
    """scale * A B `[vocab, D]`, float32."""
    return self.scale * (self.lora.lora_a[...].astype(jnp.float32)
                         @ self.lora.lora_b[...].astype(jnp.float32))

  def table(self) -> jax.Array:
    """The adapted table E + scale * A B, in the param dtype."""
    embedding = self.embedding[...]
    return (embedding.astype(jnp.float32) + self.delta()).astype(embedding.dtype)

  def __call__(self, inputs, out_sharding=None):
    """inputs `[...]` int -> `[..., D]`: E[inputs] + scale * A[inputs] B (no `[vocab, D]` made)."""
    out = super().__call__(inputs, out_sharding=out_sharding)
    rows = jnp.take(self.lora.lora_a[...], inputs, axis=0).astype(jnp.float32)
    update = self.scale * (rows @ self.lora.lora_b[...].astype(jnp.float32))
    return out + update.astype(out.dtype)

  def merged(self) -> nnx.Embed:
    """A plain Embed whose table is E + scale * A B."""
    embed = nnx.Embed(self.num_embeddings, self.features, dtype=self.dtype,
                      param_dtype=self.param_dtype, rngs=nnx.Rngs(0))
    embed.embedding = nnx.Param(self.table())
    return embed


def replace_submodule(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
  """Sets the submodule at `path` (attribute names and list indices, as `iter_modules` gives)."""
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if isinstance(path[-1], int):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def module_path(path: tuple, prefix: str = '') -> str:
  """'model/blocks/0/attn/qkv' for a module's path tuple under `prefix`."""
  return '/'.join(([prefix] if prefix else []) + [str(k) for k in path])


def apply_lora(model: nnx.Module, *, targets: str, rank: int, alpha: float, rngs: nnx.Rngs,
               prefix: str = '', embed_rank: int = 0, dora: bool = False) -> list[str]:
  """Wraps every `nnx.Linear` (in a `LoRALinear`) and `nnx.Embed` (in a `LoRAEmbed`) whose
  '/'-joined path (under `prefix`) `re.search`es `targets`, in place; returns the wrapped paths
  (possibly none). Embeds get rank `embed_rank` (0: `rank`) and alpha scaled to keep
  alpha / rank. `dora`: the Linears are DoRA (the module docstring).

  Raises:
    ValueError: a rank outside [1, min(in, out)] of a target.
  """
  pattern = re.compile(targets)
  chosen = [(path, m) for path, m in nnx.iter_modules(model)
            if type(m) in (nnx.Linear, nnx.Embed) and path
            and pattern.search(module_path(path, prefix))]
  embed_rank = embed_rank or rank
  for path, layer in chosen:
    if type(layer) is nnx.Embed:
      new = LoRAEmbed(layer, rank=embed_rank, alpha=alpha * embed_rank / rank, rngs=rngs)
    else:
      new = LoRALinear(layer, rank=rank, alpha=alpha, rngs=rngs, dora=dora)
    replace_submodule(model, path, new)
  return [module_path(path, prefix) for path, _ in chosen]


def linear_paths(model: nnx.Module, prefix: str = '') -> list[str]:
  """The paths of the model's plain `nnx.Linear` and `nnx.Embed` modules (what `targets` can
  match)."""
  return [module_path(path, prefix) for path, m in nnx.iter_modules(model)
          if type(m) in (nnx.Linear, nnx.Embed) and path]


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Replaces every `LoRALinear` / `LoRAEmbed` by its `merged()` plain module, in place;
  returns the model."""
  for path, m in list(nnx.iter_modules(model)):
    if isinstance(m, (LoRALinear, LoRAEmbed)):
      replace_submodule(model, path, m.merged())
  return model
