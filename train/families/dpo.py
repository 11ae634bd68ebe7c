"""Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model"), on the shared loop.

Networks: 'model', the policy (a GPT started from the SFT run with config.init_from, trained),
and 'reference', a frozen GPT loaded from config.dpo.reference (usually the same SFT run: the
loop's `networks_from_runs`; it has no optimizer, so it gets no gradient and stays as loaded).
With log pi(y | x) summed over the response tokens and their [EOS] (the prompt is context only),
the loss per pair is (DPO's eq. 7)

  -log sigmoid(beta * ((log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))))

averaged over pairs; beta = config.dpo.beta > 0. While the policy equals the reference every
term is -log sigmoid(0) = ln 2. Metrics: loss, reward_margin (the mean of beta times the
difference above: the implicit reward of the chosen minus the rejected response), accuracy (the
share of pairs with a positive margin), chosen_reward and rejected_reward (beta times each
response's log-ratio); the eval rows hold the same on the validation pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from train import storage
from train import text as text_lib
from train import tune
from train.errors import UserError
from train.families import pairs


def dpo_loss(policy_logp: jax.Array, reference_logp: jax.Array, beta: float
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """policy_logp, reference_logp `[batch, 2]` (chosen, rejected summed log-probabilities) ->
  (mean loss, metrics)."""
  rewards = beta * (policy_logp - reference_logp)            # [batch, 2] implicit rewards
  margin = rewards[:, 0] - rewards[:, 1]
  # -log sigmoid(margin): the binary cross-entropy of the margin with label 1.
  loss = optax.losses.sigmoid_binary_cross_entropy(margin, jnp.ones_like(margin))
  return jnp.mean(loss), {
      'reward_margin': jnp.mean(margin),
      'accuracy': jnp.mean((margin > 0).astype(jnp.float32)),
      'chosen_reward': jnp.mean(rewards[:, 0]), 'rejected_reward': jnp.mean(rewards[:, 1])}


class DPOFamily(pairs.PairsFamily):
  """config.dpo: reference (RUN_DIR[:STEP] of the frozen reference, a run of the same
  tokenizer and model section), beta (> 0). Otherwise as pairs.PairsFamily."""

  name = 'dpo'

  def __init__(self, config):
    super().__init__(config)
    self.beta = float(config.dpo.beta)
    if not self.beta > 0:
      raise UserError(f'config.dpo.beta={config.dpo.beta}: must be > 0 (the strength of the '
                      'pull towards the reference)')
    if not str(config.dpo.get('reference') or ''):
      raise UserError('config.dpo.reference: empty; name the frozen reference run (usually the '
                      'SFT run, as config.init_from)')

  def networks_from_runs(self):
    return {'reference': (str(self.config.dpo.reference), 'model', 'config.dpo.reference')}

  def setup_data(self, process_index: int, process_count: int) -> None:
    super().setup_data(process_index, process_count)
    # The loop checks the reference's family.json (vocabulary size) when it loads it; the
    # merges must match too, or its log-probabilities would be of other tokens.
    reference = str(self.config.dpo.reference)
    path = storage.join(tune.parse_init_from(reference)[0], text_lib.TOKENIZER_FILE)
    if storage.isfile(path) and text_lib.SubwordTokenizer.load(path).to_str() != \
        self.tokenizer.to_str():
      raise UserError(f'config.dpo.reference={reference}: its tokenizer differs from '
                      f'config.init_from={self.config.init_from}\'s')

  def make_models(self, rngs):
    policy = super().make_models(rngs)['model']
    return {'model': policy, 'reference': super().make_models(rngs)['model']}

  def optimizers(self, make_tx):
    return {'model': make_tx(self.config.optimizer)}   # the reference stays frozen

  def loss(self, models, batch, rng, *, train: bool):
    inputs, targets, weights = pairs.flatten_pairs(batch)     # [2 * batch, L] each
    policy = models['model'](inputs, dropout_key=rng if train else None)
    reference = jax.lax.stop_gradient(models['reference'](inputs))
    logp = lambda logits: pairs.response_log_probs(logits, targets, weights).reshape(-1, 2)
    return dpo_loss(logp(policy), logp(reference), self.beta)

