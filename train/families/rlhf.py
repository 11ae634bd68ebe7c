"""RLHF with PPO and a per-token KL penalty to a frozen reference, on the shared loop.

Networks: 'model', the policy (`models.scalar_head.ScalarHeadGPT`: the SFT run's GPT from
config.init_from plus a value head, trained), 'reference', a frozen GPT from
config.rlhf.reference (usually the SFT run), and 'reward', a frozen reward model (a run of the
`reward` family, config.rlhf.reward). The frozen networks come through the loop's
`networks_from_runs`: no optimizer, loaded at a fresh start, recorded in every checkpoint.
config.rlhf.reward may name several reward runs, comma-separated (networks 'reward',
'reward_1', 'reward_2', ...): an ensemble, whose score is the mean of its members' scores
(the "mean optimisation" of Coste et al. 2024, "Reward Model Ensembles Help Mitigate
Overoptimization"), averaged as they are, without normalising each: members trained alike on
the same pairs (e.g. other seeds; each head starts at zero) score on comparable scales.

One loop step is one PPO iteration, all inside the family's jitted `train_step` (the protocol
needs no other hook, and the loop is not forked):
  1. Rollout: the step's batch holds train prompts (a pure function of (seed, step)); the
     policy answers each with `models.gpt.sample_continue` (the KV-cache sampler, temperature
     config.rlhf.temperature, up to config.rlhf.max_new_tokens tokens or [EOS]); row i draws
     from a key folded from (the step's key, i), so a resumed or resharded run draws the same
     responses.
  2. Scoring, without gradients: the policy's token log-probabilities and values, the
     reference's log-probabilities, and the reward model's score of each prompt + response
     (read, as in reward training, at the position whose input is the response's last token;
     an ensemble's mean).
  3. Per-token rewards (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
     Preferences"; Ouyang et al. 2022): r_t = -beta * (log pi(y_t) - log ref(y_t)) on every
     response token, plus the reward model's score on the last one; beta = config.rlhf.beta > 0,
     fixed, or, with config.rlhf.target_kl = T > 0, adaptive (Ziegler et al. 2019, section
     2.2): it starts at config.rlhf.beta and after each rollout becomes
       beta * (1 + K * clip(KL / T - 1, -0.2, 0.2)),   K = config.rlhf.kl_gain (0.1 there),
     KL the rollouts' mean exact KL to the reference (the `kl` metric): raised while the
     policy is further than T nats from the reference, lowered while it is nearer. The new
     value applies from the next step; it lives in the train state (network 'kl_control', a
     non-param variable), so a resumed run goes on with the value it had.
     With config.rlhf.reference_logp_weight = w > 0 the response's return gains w times
     the reference's mean token log-probability of it (its tokens and [EOS]), paid per token:
     r_t += w * log ref(y_t) / (response length). A second scorer that needs no training:
     the SFT model's likelihood can agree with the judge about as often as a trained reward
     model does (experiments/pair_accuracy.py measures both and their sum); with the
     reference = the SFT model it pulls the policy towards answers the SFT model finds more
     likely per token.
     With config.rlhf.group_size = k > 1 each prompt is answered k times in the batch
     and the score in r_t is replaced by its leave-one-out difference, score - (mean of the
     other k - 1 scores of the same prompt) (the REINFORCE leave-one-out baseline of Ahmadian
     et al. 2024, "Back to Basics"): a Bradley-Terry reward model's scores are defined up to a
     per-prompt constant, which this removes before the value head has to learn it.
     Advantages by GAE (Schulman et al. 2016) with gamma = 1 and
     lambda = config.rlhf.gae_lambda over the response tokens, whitened over the batch; returns
     = advantages (before whitening) + values.
  4. config.rlhf.ppo_epochs optimizer updates on the whole rollout batch, each minimising
     (Schulman et al. 2017, "Proximal Policy Optimization Algorithms")
       -mean_t min(ratio_t A_t, clip(ratio_t, 1 - eps, 1 + eps) A_t)
       + vf_coef * 0.5 * mean_t (V_t - return_t)^2,       ratio_t = pi(y_t) / pi_old(y_t),
     means over response tokens, eps = config.rlhf.clip. The value head reads the policy's
     hidden states through stop_gradient (`ScalarHeadGPT.logits_and_values`): a critic on the
     policy's features that does not pull on its trunk. The optimizer's step count (and
     schedule) advances once per update, ppo_epochs times per loop step; the value head's
     updates are multiplied by config.rlhf.value_lr_scale (> 0; 1: the policy's learning rate),
     as a critic that starts at zero may need to learn faster than the policy moves.
Logs: beta (the coefficient of the step's rewards), reward (the reward model's mean score),
reference_logp (the reference's mean token log-probability of the responses, mean over them),
kl (the exact KL(pi || ref) of each response position's next-token distribution, summed over
the response, mean over rollouts), kl_sampled
(sum of the log-ratios of the sampled tokens, the estimator in the reward), entropy (per
response token), clip_fraction, value_loss, policy_loss, response_tokens; loss is the last
update's. The eval rows: reward, kl and response_tokens of rollouts on the validation prompts
(a fixed key).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import gpt as gpt_lib
from models import scalar_head
from train import metrics as metrics_lib
from train import optim
from train import storage
from train import text as text_lib
from train import tune
from train.errors import UserError
from train.families import pairs
from train.families import reward as reward_lib


# ------------------------------------------------------------------------ the pure pieces
def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """logits `[n, seq, vocab]`, targets `[n, seq]` -> `[n, seq]` float32 log p(target)."""
  return -optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def token_kl(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
  """`[..., vocab]` twice -> `[...]`: the exact KL(p || q) = sum_v p(v) (log p(v) - log q(v))
  of two next-token distributions given as logits."""
  logp, logq = jax.nn.log_softmax(logits_p, -1), jax.nn.log_softmax(logits_q, -1)
  return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def token_entropy(logits: jax.Array) -> jax.Array:
  """`[..., vocab]` -> `[...]`: -sum_v p(v) log p(v)."""
  logp = jax.nn.log_softmax(logits, -1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def ppo_policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array,
                    mask: jax.Array, clip: float) -> tuple[jax.Array, jax.Array]:
  """PPO's clipped surrogate (to minimise) over the masked tokens, and the share of tokens
  whose ratio lies outside [1 - clip, 1 + clip]. All inputs `[n, seq]`."""
  ratio = jnp.exp(logp - old_logp)
  surrogate = jnp.minimum(ratio * advantages,
                          jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * advantages)
  clipped = (jnp.abs(ratio - 1.0) > clip).astype(jnp.float32)
  return -masked_mean(surrogate, mask), masked_mean(clipped, mask)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, lam: float,
        gamma: float = 1.0) -> jax.Array:
  """Generalised advantage estimates `[n, seq]` of per-token rewards and values `[n, seq]`
  over the positions where mask is 1 (a contiguous response); 0 elsewhere. The value after
  the last response token is 0 (the episode ends)."""
  def step(carry, xs):
    next_value, next_advantage = carry
    r, v, m = xs
    delta = r + gamma * next_value - v
    advantage = (delta + gamma * lam * next_advantage) * m
    return (v * m, advantage), advantage

  zeros = jnp.zeros(rewards.shape[0], jnp.float32)
  swap = lambda x: jnp.swapaxes(x, 0, 1)[::-1]           # [seq, n], last position first
  _, advantages = jax.lax.scan(step, (zeros, zeros), (swap(rewards), swap(values), swap(mask)))
  return jnp.swapaxes(advantages[::-1], 0, 1)


def response_mean(x: jax.Array, weights: jax.Array) -> jax.Array:
  """x `[n, S]` averaged over each row's response positions (weights 1) `[n]`; 0 for a row
  without any."""
  return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


def whiten(x: jax.Array, mask: jax.Array) -> jax.Array:
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  return (x - mean) * jax.lax.rsqrt(var + 1e-8) * mask


def response_rows(prompts: jax.Array, lengths: jax.Array, responses: jax.Array, eos_id: int
                  ) -> dict[str, jax.Array]:
  """Prompt + response as language-model rows.

  prompts `[n, width]` (right-padded), lengths `[n]`, responses `[n, T]` (the sampler's
  tokens after each prompt) -> inputs, targets `[n, width + T - 1]` int32 and weights (1 on the
  targets that are response tokens up to and including the first [EOS]), as the instruction
  and preference rows have them.
  """
  n, width = prompts.shape
  t = responses.shape[1]
  pos = jnp.arange(width + t)[None, :]                        # [1, S]
  rel = pos - lengths[:, None]                                # [n, S]: index in the response
  # A response token counts while no [EOS] came before it.
  is_eos = (responses == eos_id).astype(jnp.int32)
  alive = (jnp.cumsum(is_eos, axis=1) - is_eos) == 0          # [n, T]
  in_response = (rel >= 0) & (rel < t)
  picked = jnp.clip(rel, 0, t - 1)
  keep = in_response & jnp.take_along_axis(alive, picked, axis=1)
  prompt_part = jnp.pad(prompts, ((0, 0), (0, t)))
  seq = jnp.where(rel < 0, prompt_part,
                  jnp.where(keep, jnp.take_along_axis(responses, picked, axis=1), 0))
  return {'inputs': seq[:, :-1].astype(jnp.int32), 'targets': seq[:, 1:].astype(jnp.int32),
          'weights': keep[:, 1:].astype(jnp.float32)}


def adaptive_beta(beta: jax.Array, kl: jax.Array, target: float, gain: float) -> jax.Array:
  """Ziegler et al. 2019's proportional controller of the KL coefficient: beta times
  1 + gain * clip(kl / target - 1, -0.2, 0.2)."""
  return beta * (1.0 + gain * jnp.clip(kl / target - 1.0, -0.2, 0.2))


class KLCoefficient(nnx.Variable):
  """The adaptive KL coefficient: train state, not a param (no gradient, no optimizer)."""


class KLController(nnx.Module):
  """Holds the adaptive beta between steps (the network 'kl_control')."""

  def __init__(self, beta: float):
    self.beta = KLCoefficient(jnp.asarray(beta, jnp.float32))


def leave_one_out(score: jax.Array, group_size: int) -> jax.Array:
  """score `[n]` (n = prompts x group_size, each prompt's answers adjacent) minus, for each,
  the mean of the other answers to its prompt; group_size 1: the scores unchanged."""
  if group_size == 1:
    return score
  groups = score.reshape(-1, group_size)
  others = (jnp.sum(groups, axis=1, keepdims=True) - groups) / (group_size - 1)
  return (groups - others).reshape(score.shape)


def reward_runs(spec) -> list[str]:
  """config.rlhf.reward's runs: 'RUN_DIR[:STEP]', or several of them comma-separated."""
  return [part.strip() for part in str(spec or '').split(',') if part.strip()]


def reward_networks(count: int) -> list[str]:
  """The names of an ensemble's reward networks: 'reward', then 'reward_1', 'reward_2', ..."""
  return ['reward'] + [f'reward_{k}' for k in range(1, count)]


def rollout_keys(key: jax.Array, rows: jax.Array) -> jax.Array:
  """One sampling key per global batch row: a row's response depends on (key, its index)
  only, not on how the batch is split over devices or processes."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(rows)


def ensemble_score(reward_models, inputs: jax.Array, index: jax.Array) -> jax.Array:
  """The mean of the reward models' scores (`ScalarHeadGPT.score` at `index`) `[n]`."""
  scores = [m.score(inputs, index) for m in reward_models]
  return sum(scores[1:], scores[0]) / len(scores)


# ------------------------------------------------------------------------------- the family
class RLHFFamily(pairs.PairsFamily):
  """config.rlhf: reward (RUN_DIR[:STEP], or several comma-separated: an ensemble) and
  reference (RUN_DIR[:STEP]), beta (> 0), target_kl (>= 0; 0: beta fixed, else the KL in nats
  an adaptive beta steers to) and kl_gain (in (0, 1]: its step size), clip, ppo_epochs,
  gae_lambda, vf_coef, temperature, max_new_tokens, prompt_len (the prompts' padded width;
  longer prompts are dropped; prompt_len + max_new_tokens <= model.block_size), group_size
  (answers per train prompt, dividing batch_size; 1: one each, no leave-one-out baseline),
  value_lr_scale (the value head's learning rate over the policy's) and reference_logp_weight
  (>= 0: the weight of the reference's mean token log-probability in the return, paid per
  token; 0: none).
  Training prompts are the pairs file's train split, evaluation prompts its validation split."""

  name = 'rlhf'

  def __init__(self, config):
    super().__init__(config)
    r = config.rlhf
    self.beta = float(r.beta)
    if not self.beta > 0:
      raise UserError(f'config.rlhf.beta={r.beta}: must be > 0 (the strength of the KL '
                      'penalty to the reference)')
    # Absent in runs written before the keys: beta fixed.
    self.target_kl, self.kl_gain = float(r.get('target_kl', 0.0)), float(r.get('kl_gain', 0.1))
    if not self.target_kl >= 0 or not 0 < self.kl_gain <= 1:
      raise UserError(f'config.rlhf.target_kl={r.get("target_kl")}, config.rlhf.kl_gain='
                      f'{r.get("kl_gain")}: the target must be >= 0 (0: beta fixed) and the '
                      'gain in (0, 1]')
    for key, what in (('reward', 'a reward-family run, or several comma-separated'),
                      ('reference', 'usually the SFT run')):
      if not str(r.get(key) or '').strip(' ,'):
        raise UserError(f'config.rlhf.{key}: empty; name the frozen {key} run ({what})')
    runs = reward_runs(r.reward)
    self.rewards = dict(zip(reward_networks(len(runs)), runs))   # network name -> run
    self.max_new_tokens, self.prompt_len = int(r.max_new_tokens), int(r.prompt_len)
    if self.max_new_tokens < 1 or self.prompt_len < 2 or \
        self.prompt_len + self.max_new_tokens > config.model.block_size:
      raise UserError(f'config.rlhf.prompt_len={self.prompt_len} + config.rlhf.max_new_tokens='
                      f'{self.max_new_tokens}: each >= 1 and together <= config.model.block_size'
                      f'={config.model.block_size}')
    if not 0 < float(r.clip) < 1 or int(r.ppo_epochs) < 1 or not 0 <= float(r.gae_lambda) <= 1 \
        or float(r.temperature) <= 0:
      raise UserError(f'config.rlhf: clip={r.clip} must be in (0, 1), ppo_epochs='
                      f'{r.ppo_epochs} >= 1, gae_lambda={r.gae_lambda} in [0, 1] and '
                      f'temperature={r.temperature} > 0')
    self.value_lr_scale = float(r.get('value_lr_scale', 1.0))   # absent in older runs: 1
    if not self.value_lr_scale > 0:
      raise UserError(f'config.rlhf.value_lr_scale={r.value_lr_scale}: must be > 0 (the value '
                      'head\'s learning rate over the policy\'s)')
    # Absent in runs written before the key: no such term.
    self.reference_logp_weight = float(r.get('reference_logp_weight', 0.0))
    if not self.reference_logp_weight >= 0:
      raise UserError(f'config.rlhf.reference_logp_weight={r.reference_logp_weight}: must be '
                      '>= 0 (the weight of the reference\'s mean token log-probability in the '
                      'return)')
    group = r.get('group_size')   # runs written before the key: one answer per prompt
    self.group_size = 1 if group is None else int(group)
    if self.group_size < 1 or config.batch_size % self.group_size:
      raise UserError(f'config.rlhf.group_size={r.group_size}: must be >= 1 and divide '
                      f'config.batch_size={config.batch_size}')

  def networks_from_runs(self):
    return {'reference': (str(self.config.rlhf.reference), 'model', 'config.rlhf.reference'),
            **{name: (spec, 'model', 'config.rlhf.reward')
               for name, spec in self.rewards.items()}}

  # ---- data ----
  def setup_data(self, process_index: int, process_count: int) -> None:
    super().setup_data(process_index, process_count)   # tokenizer and pair-file checks
    # The loop checks each frozen run's family.json (vocabulary size) when it loads it; the
    # merges must match too, or its scores would be of other tokens.
    frozen = [('reference', str(self.config.rlhf.reference))]
    frozen += [('reward', spec) for spec in self.rewards.values()]
    for key, spec in frozen:
      path = storage.join(tune.parse_init_from(spec)[0], text_lib.TOKENIZER_FILE)
      if storage.isfile(path) and text_lib.SubwordTokenizer.load(path).to_str() != \
          self.tokenizer.to_str():
        raise UserError(f'config.rlhf.{key}={spec}: its tokenizer differs from '
                        f'config.init_from={self.config.init_from}\'s')
    c = self.config
    prompts = {}
    for split in ('train', 'validation'):
      ids = [r['prompt_ids'] for r in self.records[split]]
      prompts[split] = [np.asarray(p, np.int32) for p in ids if len(p) <= self.prompt_len]
      if len(prompts[split]) < len(ids):
        metrics_lib.print_line(f'{split} prompts: dropped {len(ids) - len(prompts[split])} of '
                               f'{len(ids)} (longer than config.rlhf.prompt_len='
                               f'{self.prompt_len})')
    if not prompts['train']:
      raise UserError(f'config.preferences.path={c.preferences.path}: no training prompt of '
                      f'at most config.rlhf.prompt_len={self.prompt_len} tokens')
    self._prompts = prompts['train']
    local = c.batch_size // process_count
    self._slice = slice(process_index * local, (process_index + 1) * local)
    val = prompts['validation']
    count = min(len(val) // c.batch_size, c.eval_batches)
    self._eval = [self._prompt_batch(val, range(k * c.batch_size, (k + 1) * c.batch_size))
                  for k in range(count)]
    if not self._eval and c.eval_every:
      raise UserError(f'config.preferences.path={c.preferences.path}: fewer validation prompts '
                      f'than config.batch_size={c.batch_size}; set config.eval_every=0')

  def _prompt_batch(self, prompts, picks) -> dict[str, np.ndarray]:
    """prompts `[n, prompt_len]` (right-padded), lengths and rows (global row index) `[n]`,
    this process's share of the global rows `picks`."""
    picks = list(picks)
    rows = np.arange(len(picks), dtype=np.int32)[self._slice]
    chosen = [prompts[picks[i]] for i in rows]
    padded = np.zeros((len(chosen), self.prompt_len), np.int32)
    for i, p in enumerate(chosen):
      padded[i, :len(p)] = p
    return {'prompts': padded, 'lengths': np.array([len(p) for p in chosen], np.int32),
            'rows': rows}

  def train_batch(self, step: int):
    rng = np.random.default_rng([self.config.seed, step])
    picks = rng.integers(0, len(self._prompts), self.config.batch_size // self.group_size)
    picks = np.repeat(picks, self.group_size)   # each prompt's answers in adjacent rows
    return self._prompt_batch(self._prompts, picks)

  def eval_batches(self):
    return self._eval

  # ---- networks ----
  def make_models(self, rngs):
    m = self.config.model
    return {'model': self.build_gpt(m, rngs, cls=scalar_head.ScalarHeadGPT),
            'reference': self.build_gpt(m, rngs),
            **{name: self.build_gpt(m, rngs, cls=scalar_head.ScalarHeadGPT)
               for name in self.rewards},
            **({'kl_control': KLController(self.beta)} if self.target_kl > 0 else {})}

  def optimizers(self, make_tx):
    tx = make_tx(self.config.optimizer)
    k = self.value_lr_scale
    if k != 1.0:   # the value head's updates times k: its learning rate (and decay) k times
      tx = optim.scale_updates(tx, k, lambda path: 'value_head' in jax.tree_util.keystr(path))
    return {'model': tx}   # reference and reward stay frozen

  # ---- rollouts ----
  def rollout(self, models, batch, key: jax.Array) -> dict[str, jax.Array]:
    """Samples responses to batch's prompts and scores them (no gradients): the rows
    (`response_rows`) plus old_logp, ref_logp, values `[n, S-1]`, kl, entropy `[n, S-1]` and
    score `[n]`."""
    policy = models['model']
    responses = gpt_lib.sample_continue(
        policy, batch['prompts'], batch['lengths'], rollout_keys(key, batch['rows']),
        max_new_tokens=self.max_new_tokens, temperature=float(self.config.rlhf.temperature))
    rows = response_rows(batch['prompts'], batch['lengths'], responses, self._eos_id)
    logits, values = policy.logits_and_values(rows['inputs'])
    ref_logits = models['reference'](rows['inputs'])
    score = ensemble_score([models[name] for name in self.rewards], rows['inputs'],
                           reward_lib.last_response_index(rows['weights']))
    out = {**rows, 'old_logp': token_log_probs(logits, rows['targets']),
           'ref_logp': token_log_probs(ref_logits, rows['targets']), 'values': values,
           'kl': token_kl(logits, ref_logits), 'entropy': token_entropy(logits), 'score': score}
    return jax.tree.map(jax.lax.stop_gradient, out)

  def advantages(self, ro, beta) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(per-token rewards, whitened advantages, returns), each `[n, S-1]`, with KL
    coefficient `beta`."""
    w = ro['weights']
    last = jax.nn.one_hot(reward_lib.last_response_index(w), w.shape[1]) * w
    score = leave_one_out(ro['score'], self.group_size)
    rewards = -beta * (ro['old_logp'] - ro['ref_logp']) * w + score[:, None] * last
    if self.reference_logp_weight:   # w x the mean over the response, spread over its tokens
      length = jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)
      rewards += self.reference_logp_weight * ro['ref_logp'] * w / length
    adv = gae(rewards, ro['values'], w, float(self.config.rlhf.gae_lambda))
    return rewards, whiten(adv, w), (adv + ro['values']) * w

  def loss(self, models, batch, rng, *, train: bool):
    """PPO's loss on a scored rollout batch (inputs, targets, weights, old_logp, advantages,
    returns)."""
    logits, values = models['model'].logits_and_values(
        batch['inputs'], dropout_key=rng if train else None)
    w = batch['weights']
    logp = token_log_probs(logits, batch['targets'])
    policy_loss, clip_fraction = ppo_policy_loss(logp, batch['old_logp'], batch['advantages'],
                                                 w, float(self.config.rlhf.clip))
    value_loss = 0.5 * masked_mean(jnp.square(values - batch['returns']), w)
    loss = policy_loss + float(self.config.rlhf.vf_coef) * value_loss
    return loss, {'policy_loss': policy_loss, 'value_loss': value_loss,
                  'clip_fraction': clip_fraction}

  def train_step(self, ctx, batch, rng):
    rollout_key, update_key = jax.random.split(rng)
    models = ctx.models()
    ro = self.rollout(models, batch, rollout_key)
    beta = models['kl_control'].beta[...] if self.target_kl > 0 else jnp.float32(self.beta)
    _, advantages, returns = self.advantages(ro, beta)
    data = {k: ro[k] for k in ('inputs', 'targets', 'weights', 'old_logp')}
    data.update(advantages=advantages, returns=returns)
    w = ro['weights']
    metrics = {**self._rollout_metrics(ro), 'beta': beta}
    if self.target_kl > 0:   # the next step's beta, from this rollout's KL
      control = models['kl_control']
      control.beta[...] = adaptive_beta(beta, metrics['kl'], self.target_kl, self.kl_gain)
      ctx.update_rest('kl_control', control)
    for epoch in range(int(self.config.rlhf.ppo_epochs)):
      loss, m, grads = ctx.value_and_grad(
          lambda models, b, r: self.loss(models, b, r, train=True), 'model', data,
          jax.random.fold_in(update_key, epoch))
      metrics.update(m, loss=loss, **ctx.apply_gradients('model', grads))
    metrics['entropy'] = masked_mean(ro['entropy'], w)
    metrics['kl_sampled'] = jnp.mean(jnp.sum((ro['old_logp'] - ro['ref_logp']) * w, axis=1))
    return metrics

  def _rollout_metrics(self, ro) -> dict[str, jax.Array]:
    w = ro['weights']
    return {'reward': jnp.mean(ro['score']), 'kl': jnp.mean(jnp.sum(ro['kl'] * w, axis=1)),
            'response_tokens': jnp.mean(jnp.sum(w, axis=1)),
            'reference_logp': jnp.mean(response_mean(ro['ref_logp'], w))}

  def eval_step(self, models, batch):
    ro = self.rollout(models, batch, jax.random.key(0))
    return {**self._rollout_metrics(ro), 'loss': -jnp.mean(ro['score'])}

  def items_per_step(self) -> int:
    return self.config.batch_size * self.max_new_tokens   # response tokens sampled (at most)
