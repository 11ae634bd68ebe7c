"""A GPT with a scalar head: a reward model (Bradley-Terry on preference pairs) or a value
function (a PPO critic), sharing the language model's trunk and param paths.

`ScalarHeadGPT` subclasses `models.gpt.GPT`, so its params are the GPT's (wte, wpe, blocks,
ln_f: a run of the GPT families restores into it by path, e.g. with config.init_from) plus
`value_head` (`[embed, 1]` kernel and `[1]` bias), which a restore leaves at its init. The head
reads the final-LayerNorm hidden state of every position; it starts at zero, so at init every
sequence scores 0 and every preference pair is a tie (Bradley-Terry loss ln 2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models import gpt
from models import layers


class ScalarHeadGPT(gpt.GPT):
  """GPT trunk -> final LayerNorm -> Linear(embed, 1): one scalar per position."""

  def __init__(self, *, rngs: nnx.Rngs, **gpt_kwargs):
    super().__init__(rngs=rngs, **gpt_kwargs)
    self.value_head = nnx.Linear(self.embed_dim, 1, kernel_init=nnx.initializers.zeros,
                                 dtype=self.dtype, param_dtype=gpt_kwargs.get(
                                     'param_dtype', jnp.float32), rngs=rngs)

  def values(self, tokens: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """tokens `[batch, seq]` -> float32 `[batch, seq]`: the head at every position (position t
    has seen tokens [0, t])."""
    batch, seq = tokens.shape
    h = self.ln_f(self._trunk(tokens, dropout_key))        # [batch * seq, embed]
    return self.value_head(h).astype(jnp.float32).reshape(batch, seq)

  def logits_and_values(self, tokens: jax.Array, *, dropout_key: jax.Array | None = None
                        ) -> tuple[jax.Array, jax.Array]:
    """tokens `[batch, seq]` -> (float32 logits `[batch, seq, vocab]`, float32 values
    `[batch, seq]`), one trunk pass. The head reads the hidden state through stop_gradient: a
    PPO critic on the policy's features that does not pull on the policy's trunk."""
    batch, seq = tokens.shape
    h = self.ln_f(self._trunk(tokens, dropout_key))        # [batch * seq, embed]
    logits = layers.tied_logits(h, self.wte).reshape(batch, seq, self.vocab_size)
    values = self.value_head(jax.lax.stop_gradient(h)).astype(jnp.float32).reshape(batch, seq)
    return logits, values

  def score(self, tokens: jax.Array, index: jax.Array, *,
            dropout_key: jax.Array | None = None) -> jax.Array:
    """tokens `[batch, seq]`, index `[batch]` int -> float32 `[batch]`: the head at position
    index[i] of row i (a reward model reads it at the response's last token)."""
    values = self.values(tokens, dropout_key=dropout_key)
    return jnp.take_along_axis(values, index[:, None].astype(jnp.int32), axis=1)[:, 0]
