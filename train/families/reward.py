"""A reward model: the SFT run's GPT with a scalar head, trained on preference pairs.

Bradley-Terry (Bradley & Terry 1952; as in Ouyang et al. 2022, "Training language models to
follow instructions with human feedback"): the probability that the chosen response beats the
rejected one is sigmoid(r_chosen - r_rejected), and the loss is its negative log,
-log sigmoid(r_c - r_r), averaged over pairs. r is `models.scalar_head.ScalarHeadGPT`'s head at
the position whose input is the response's last token (the one that predicts its [EOS]: the
whole response has been read; for a response cut at the token budget, its second-to-last
token). The head starts at zero (every pair a tie: loss ln 2) and everything else from
config.init_from (the SFT run). Metrics: loss, accuracy (r_c > r_r), margin (r_c - r_r); the
eval rows hold the same on the validation pairs (pairwise accuracy). A PPO family can reuse the
trained model as its reward (ScalarHeadGPT.score) and ScalarHeadGPT as its critic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from models import scalar_head
from train.families import pairs


def bradley_terry_loss(r_chosen: jax.Array, r_rejected: jax.Array) -> jax.Array:
  """-log sigmoid(r_c - r_r) per pair: the binary cross-entropy of the margin with label 1
  (optax's, stable for any margin)."""
  margin = r_chosen - r_rejected
  return optax.losses.sigmoid_binary_cross_entropy(margin, jnp.ones_like(margin))


def last_response_index(weights: jax.Array) -> jax.Array:
  """weights `[n, seq]` (1 on the response's target positions) -> `[n]` int32: the last
  weighted position, whose input is the response's last token before [EOS]."""
  seq = weights.shape[-1]
  return (seq - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1)).astype(jnp.int32)


class RewardFamily(pairs.PairsFamily):
  """config as pairs.PairsFamily's (model: the SFT run's GPT section)."""

  name = 'reward'

  def make_models(self, rngs):
    return {'model': self.build_gpt(self.config.model, rngs, cls=scalar_head.ScalarHeadGPT)}

  def rewards(self, model: scalar_head.ScalarHeadGPT, batch, dropout_key=None) -> jax.Array:
    """`[batch, 2]` float32: the reward of the chosen (0) and the rejected (1) response."""
    inputs, _, weights = pairs.flatten_pairs(batch)
    r = model.score(inputs, last_response_index(weights), dropout_key=dropout_key)
    return r.reshape(-1, 2)

  def loss(self, models, batch, rng, *, train: bool):
    r = self.rewards(models['model'], batch, rng if train else None)
    margin = r[:, 0] - r[:, 1]
    return jnp.mean(bradley_terry_loss(r[:, 0], r[:, 1])), {
        'accuracy': jnp.mean((margin > 0).astype(jnp.float32)), 'margin': jnp.mean(margin)}

