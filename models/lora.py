"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as model surgery.

`apply_lora` replaces chosen `nnx.Linear` modules of an already built model with `LoRALinear`:
the same kernel and bias Variables (so their param paths, e.g. 'blocks/0/attn/qkv/kernel', do
not change and a base checkpoint loads into them), plus Flax's own `nnx.LoRA` adapter under
'.../lora/lora_a' `[in, rank]` and '.../lora/lora_b' `[rank, out]` (`nnx.LoRAParam`s). The
output is y = x W + b + (alpha / rank) x A B (the paper's section 4.1 scaling); B starts at zero,
so the adapted model starts as exactly the base model. `merge_lora` folds the adapters back:
W <- W + (alpha / rank) A B, giving plain `nnx.Linear`s with the base model's param tree.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
from flax import nnx


class LoRALinear(nnx.Linear):
  """An `nnx.Linear` that adopts a base Linear's Variables and adds a scaled `nnx.LoRA`."""

  def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs):
    if not 1 <= rank <= min(base.in_features, base.out_features):
      raise ValueError(f'LoRA rank {rank} must be in [1, min(in, out) = '
                       f'{min(base.in_features, base.out_features)}] for a Linear '
                       f'{base.in_features} -> {base.out_features}')
    # Take over the base's kernel, bias and settings as they are (no new kernel is drawn).
    for name, value in vars(base).items():
      if not name.startswith('_'):
        setattr(self, name, value)
    self.scale = float(alpha) / rank
    self.lora = nnx.LoRA(base.in_features, rank, base.out_features, dtype=base.dtype,
                         param_dtype=base.param_dtype, rngs=rngs)

  def __call__(self, inputs, out_sharding=None):
    """inputs `[..., in]` -> `[..., out]`."""
    return super().__call__(inputs, out_sharding=out_sharding) + self.scale * self.lora(inputs)

  def merged(self) -> nnx.Linear:
    """A plain Linear whose kernel is W + scale * A B (float32 products, param dtype kept)."""
    linear = nnx.Linear(self.in_features, self.out_features, use_bias=self.use_bias,
                        dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                        dot_general=self.dot_general, promote_dtype=self.promote_dtype,
                        preferred_element_type=self.preferred_element_type,
                        rngs=nnx.Rngs(0))
    delta = self.lora.lora_a[...].astype(jnp.float32) @ self.lora.lora_b[...].astype(jnp.float32)
    kernel = self.kernel[...]
    linear.kernel = nnx.Param((kernel.astype(jnp.float32) + self.scale * delta
                               ).astype(kernel.dtype))
    linear.bias = self.bias
    return linear


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
               prefix: str = '') -> list[str]:
  """Wraps every `nnx.Linear` whose '/'-joined path (under `prefix`) `re.search`es `targets`
  in a `LoRALinear`, in place; returns the wrapped paths (possibly none).

  Raises:
    ValueError: a rank outside [1, min(in, out)] of a target.
  """
  pattern = re.compile(targets)
  chosen = [(path, m) for path, m in nnx.iter_modules(model)
            if type(m) is nnx.Linear and path and pattern.search(module_path(path, prefix))]
  for path, linear in chosen:
    replace_submodule(model, path, LoRALinear(linear, rank=rank, alpha=alpha, rngs=rngs))
  return [module_path(path, prefix) for path, _ in chosen]


def linear_paths(model: nnx.Module, prefix: str = '') -> list[str]:
  """The paths of the model's plain `nnx.Linear` modules (what `targets` can match)."""
  return [module_path(path, prefix) for path, m in nnx.iter_modules(model)
          if type(m) is nnx.Linear and path]


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Replaces every `LoRALinear` by its `merged()` Linear, in place; returns the model."""
  for path, m in list(nnx.iter_modules(model)):
    if isinstance(m, LoRALinear):
      replace_submodule(model, path, m.merged())
  return model
