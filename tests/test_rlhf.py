"""RLHF with PPO: the KL estimator, PPO's clipping, GAE, rollouts reproducible from their key,
and RLHF runs (one device vs 8, exact resume, bad input) from the tiny SFT run and reward
model that tests/test_alignment.py's helpers make."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import reward_gpt
from experiments.configs import rlhf_gpt
from models import gpt
from models import scalar_head
from tests.test_alignment import alignment_config
from tests.test_alignment import fails_in_one_line
from tests.test_alignment import needs_multi30k
from tests.test_alignment import run_with_another_tokenizer
from tests.test_alignment import tiny_gpt
from tests.test_sharding import assert_resumed_exactly
from train import loop
from train import optim
from train import preferences
from train import run_loader
from train import text as text_lib
from train.families import rlhf as rlhf_lib


# ------------------------------------------------------------------------ the pure pieces


def test_kl_estimators_against_the_exact_kl_of_a_toy_categorical():
  rng = np.random.default_rng(0)
  logits_p, logits_q = rng.normal(0, 1.5, (3, 7)), rng.normal(0, 1.5, (3, 7))
  p = np.exp(logits_p) / np.exp(logits_p).sum(-1, keepdims=True)
  q = np.exp(logits_q) / np.exp(logits_q).sum(-1, keepdims=True)
  exact = (p * np.log(p / q)).sum(-1)                                  # [3]
  np.testing.assert_allclose(rlhf_lib.token_kl(jnp.asarray(logits_p, jnp.float32),
                                               jnp.asarray(logits_q, jnp.float32)),
                             exact, rtol=1e-5)
  np.testing.assert_allclose(rlhf_lib.token_entropy(jnp.asarray(logits_p, jnp.float32)),
                             -(p * np.log(p)).sum(-1), rtol=1e-5)
  # The sampled estimator in the reward, log p(x) - log q(x) at x ~ p, is unbiased: its mean
  # over draws is the exact KL within 4 standard errors.
  draws = np.stack([rng.choice(7, 100_000, p=row) for row in p])      # [3, draws]
  logp = rlhf_lib.token_log_probs(
      jnp.broadcast_to(jnp.asarray(logits_p, jnp.float32)[:, None], (3, 100_000, 7)),
      jnp.asarray(draws))
  logq = rlhf_lib.token_log_probs(
      jnp.broadcast_to(jnp.asarray(logits_q, jnp.float32)[:, None], (3, 100_000, 7)),
      jnp.asarray(draws))
  sample = np.asarray(logp - logq, np.float64)
  stderr = sample.std(-1) / np.sqrt(sample.shape[-1])
  assert np.all(np.abs(sample.mean(-1) - exact) < 4 * stderr)


def test_ppo_clipping_gives_no_gradient_beyond_the_clip_range():
  clip = 0.2
  ratio = np.array([0.5, 0.9, 1.1, 1.5, 0.5, 0.9, 1.1, 1.5, 1.5])
  adv = np.array([1.0, 1.0, 1.0, 1.0, -2.0, -2.0, -2.0, -2.0, 3.0])
  mask = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0], np.float32)            # the last is padding
  old = np.linspace(-3.0, -1.0, 9)
  logp = old + np.log(ratio)
  loss_fn = lambda lp: rlhf_lib.ppo_policy_loss(
      lp[None], jnp.asarray(old[None], jnp.float32), jnp.asarray(adv[None], jnp.float32),
      jnp.asarray(mask[None]), clip)
  grad = np.asarray(jax.grad(lambda lp: loss_fn(lp)[0])(jnp.asarray(logp, jnp.float32)))
  # By hand: the loss is -(1/8) sum_t min(r_t A_t, clip(r_t) A_t), d r_t / d logp_t = r_t. The
  # clipped branch is the minimum (a constant: no gradient) exactly when A > 0 and r > 1.2, or
  # A < 0 and r < 0.8; elsewhere the gradient is -r_t A_t / 8.
  want = np.array([-0.5 * 1, -0.9 * 1, -1.1 * 1, 0.0,
                   0.0, 0.9 * 2, 1.1 * 2, 1.5 * 2, 0.0]) / 8
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
  # clip fraction: the masked tokens with |r - 1| > 0.2 (ratios 0.5 and 1.5, twice each).
  assert float(loss_fn(jnp.asarray(logp, jnp.float32))[1]) == pytest.approx(4 / 8)


def test_gae_against_its_definition_and_response_rows_by_hand():
  rng = np.random.default_rng(1)
  rewards, values = rng.normal(size=(2, 7)), rng.normal(size=(2, 7))
  mask = np.zeros((2, 7))
  mask[0, 2:6], mask[1, 1:7] = 1, 1
  lam = 0.9
  got = np.asarray(rlhf_lib.gae(*(jnp.asarray(x, jnp.float32) for x in (rewards, values, mask)),
                                lam))
  for i in range(2):
    steps = np.flatnonzero(mask[i])
    v = np.append(values[i, steps], 0.0)                # the value after the end is 0
    delta = rewards[i, steps] + v[1:] - v[:-1]
    want = [sum(lam ** l * delta[t + l] for l in range(len(steps) - t))
            for t in range(len(steps))]
    np.testing.assert_allclose(got[i, steps], want, rtol=1e-5, atol=1e-6)
    assert np.all(got[i, mask[i] == 0] == 0)
  # Prompt [EOS, 5, 6] then response 7, [EOS], 9 (the 9 after [EOS] is dropped).
  eos = text_lib.EOS_ID
  rows = rlhf_lib.response_rows(jnp.array([[eos, 5, 6, 0]]), jnp.array([3]),
                                jnp.array([[7, eos, 9]]), eos)
  np.testing.assert_array_equal(rows['inputs'], [[eos, 5, 6, 7, eos, 0]])
  np.testing.assert_array_equal(rows['targets'], [[5, 6, 7, eos, 0, 0]])
  np.testing.assert_array_equal(rows['weights'], [[0, 0, 1, 1, 0, 0]])


def test_leave_one_out_scores_and_the_rewards_they_enter():
  score = np.array([1.0, 4.0, -2.0, 0.5, 0.5, 3.5])
  # k = 3: each score minus the mean of the other two of its prompt, by hand.
  want = [1 - (4 - 2) / 2, 4 - (1 - 2) / 2, -2 - (1 + 4) / 2, 0.5 - 2, 0.5 - 2, 3.5 - 0.5]
  np.testing.assert_allclose(rlhf_lib.leave_one_out(jnp.asarray(score), 3), want, rtol=1e-6)
  np.testing.assert_array_equal(rlhf_lib.leave_one_out(jnp.asarray(score), 1), score)
  # A per-prompt constant (what a Bradley-Terry reward model leaves undefined) drops out.
  shifted = score + np.repeat([10.0, -7.0], 3)
  np.testing.assert_allclose(rlhf_lib.leave_one_out(jnp.asarray(shifted), 3), want, rtol=1e-5)
  # In the per-token rewards: the response's last token carries the centred score.
  family = rlhf_family(group_size=2, beta=0.5)
  w = np.zeros((4, 5), np.float32)
  w[:, 1:4] = 1
  rng = np.random.default_rng(0)
  ro = {'weights': jnp.asarray(w), 'old_logp': jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
        'ref_logp': jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
        'values': jnp.zeros((4, 5)), 'score': jnp.asarray([1.0, 3.0, 0.0, -1.0])}
  rewards = np.asarray(family.advantages(ro, 0.5)[0])
  kl_part = -0.5 * (np.asarray(ro['old_logp']) - np.asarray(ro['ref_logp'])) * w
  np.testing.assert_allclose(rewards[:, 3] - kl_part[:, 3], [-2.0, 2.0, 1.0, -1.0], rtol=1e-5)
  np.testing.assert_allclose(rewards[:, :3], kl_part[:, :3], rtol=1e-6)


def test_reference_logp_weight_pays_the_references_mean_log_prob_per_token():
  rng = np.random.default_rng(1)
  w = np.zeros((4, 6), np.float32)
  for i, (start, stop) in enumerate([(1, 4), (2, 6), (0, 1), (3, 5)]):
    w[i, start:stop] = 1
  old, ref = rng.normal(size=(2, 4, 6)).astype(np.float32)
  score = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
  ro = {'weights': jnp.asarray(w), 'old_logp': jnp.asarray(old), 'ref_logp': jnp.asarray(ref),
        'values': jnp.zeros((4, 6)), 'score': jnp.asarray(score)}
  kl_part = -0.3 * (old - ref) * w
  for group, weight in ((1, 0.0), (1, 2.5), (2, 2.5)):
    rewards = np.asarray(rlhf_family(reference_logp_weight=weight, group_size=group)
                         .advantages(ro, 0.3)[0])
    # Position by position: on each response token weight x its ref_logp / the response's
    # length; on the last one also the score (group 2: less the other answer's).
    if group == 2:
      score_in = [score[0] - score[1], score[1] - score[0], score[2] - score[3],
                  score[3] - score[2]]
    else:
      score_in = score
    want = np.zeros_like(w)
    for i, last in enumerate([3, 5, 0, 4]):
      length = sum(w[i])
      for t in range(6):
        if w[i, t]:
          want[i, t] = weight * ref[i, t] / length
      want[i, last] += score_in[i]
    np.testing.assert_allclose(rewards - kl_part, want, rtol=1e-5, atol=1e-6)
    # The weighted part sums over a response to weight x the mean of its ref_logp.
    np.testing.assert_allclose(
        (rewards - kl_part).sum(1),
        [score_in[i] + weight * ref[i][w[i] > 0].mean() for i in range(4)], rtol=1e-5,
        atol=1e-6)


def test_adaptive_beta_is_zieglers_proportional_controller():
  # Ziegler et al. 2019, section 2.2: e = clip((KL - T) / T, -0.2, 0.2), beta <- beta (1 + K e).
  target, gain, beta = 4.0, 0.1, 0.05
  for kl in (0.0, 2.0, 3.9, 4.0, 4.4, 6.0, 40.0):
    e = min(max((kl - target) / target, -0.2), 0.2)
    got = float(rlhf_lib.adaptive_beta(jnp.float32(beta), jnp.float32(kl), target, gain))
    np.testing.assert_allclose(got, beta * (1 + gain * e), rtol=1e-6)
  # Held on target it stays; far off it moves by at most K * 20% per step, either way.
  assert float(rlhf_lib.adaptive_beta(jnp.float32(beta), jnp.float32(target), target, gain)) \
      == np.float32(beta)


def rlhf_family(**rlhf):
  c = rlhf_gpt.get_config('tiny')
  c.update_from_flattened_dict({'preferences.path': 'unused', 'rlhf.reference': 'unused',
                                'rlhf.reward': 'unused',
                                **{f'rlhf.{k}': v for k, v in rlhf.items()}})
  return rlhf_lib.RLHFFamily(c)


def test_value_lr_scale_multiplies_the_value_heads_updates_and_no_other():
  rng = np.random.default_rng(0)
  draw = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  params = {'wte': {'embedding': draw(6, 4)},
            'value_head': {'kernel': draw(4, 1), 'bias': jnp.zeros(1)}}
  grads = [jax.tree.map(lambda x: draw(*x.shape), params) for _ in range(3)]
  updates = {}
  for k in (1.0, 10.0):
    tx = rlhf_family(value_lr_scale=k).optimizers(optim.make_optimizer)['model']
    state, updates[k] = tx.init(params), []
    for g in grads:   # through the warm-up: Adam's moments and the schedule move
      u, state = tx.update(g, state, params)
      updates[k].append(u)
  for u1, u10 in zip(updates[1.0], updates[10.0]):
    np.testing.assert_array_equal(u10['wte']['embedding'], u1['wte']['embedding'])
    for name in ('kernel', 'bias'):
      np.testing.assert_allclose(u10['value_head'][name], 10 * u1['value_head'][name], rtol=1e-6)
  assert all(np.abs(u['value_head']['kernel']).min() > 0 for u in updates[1.0][1:])


def test_rollouts_are_reproducible_from_their_key_row_by_row():
  family = rlhf_family(max_new_tokens=5, prompt_len=6)
  models = {'model': tiny_gpt(scalar_head.ScalarHeadGPT), 'reference': tiny_gpt(seed=1),
            'reward': tiny_gpt(scalar_head.ScalarHeadGPT, seed=2)}
  models['reward'].value_head.kernel[...] = jax.random.normal(jax.random.key(5), (16, 1))
  batch = {'prompts': jnp.array([[1, 2, 3, 4, 0, 0], [5, 6, 0, 0, 0, 0], [7, 8, 9, 1, 2, 3]]),
           'lengths': jnp.array([4, 2, 6]), 'rows': jnp.arange(3)}
  run = nnx.jit(family.rollout)
  a, b = run(models, batch, jax.random.key(0)), run(models, batch, jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  other = run(models, batch, jax.random.key(1))
  assert not np.array_equal(a['inputs'], other['inputs'])
  # A row samples from its global row index, wherever it sits in the batch (the same shapes:
  # no new compile).
  flipped = run(models, jax.tree.map(lambda x: x[::-1], batch), jax.random.key(0))
  np.testing.assert_array_equal(flipped['inputs'], a['inputs'][::-1])
  # The policy's own sampled tokens: their log-probabilities equal the sampler's model's.
  logits = np.asarray(nnx.jit(lambda m, x: m(x))(models['model'], a['inputs']), np.float64)
  logz = np.log(np.exp(logits).sum(-1))
  picked = np.take_along_axis(logits, np.asarray(a['targets'])[..., None], -1)[..., 0] - logz
  np.testing.assert_allclose(a['old_logp'], picked, rtol=1e-4, atol=1e-4)
  assert isinstance(models['model'], gpt.GPT)


def test_a_reward_ensemble_scores_the_mean_of_its_members():
  family = rlhf_family(reward='r0, r1:7,r2', max_new_tokens=5, prompt_len=6)
  names = ['reward', 'reward_1', 'reward_2']
  assert {k: v[0] for k, v in family.networks_from_runs().items() if k != 'reference'} == \
      dict(zip(names, ['r0', 'r1:7', 'r2']))
  models = {'model': tiny_gpt(scalar_head.ScalarHeadGPT), 'reference': tiny_gpt(seed=1)}
  for k, name in enumerate(names):
    models[name] = tiny_gpt(scalar_head.ScalarHeadGPT, seed=2 + k)
    models[name].value_head.kernel[...] = jax.random.normal(jax.random.key(5 + k), (16, 1))
  batch = {'prompts': jnp.array([[1, 2, 3, 4, 0, 0], [5, 6, 0, 0, 0, 0]]),
           'lengths': jnp.array([4, 2]), 'rows': jnp.arange(2)}
  ro = nnx.jit(family.rollout)(models, batch, jax.random.key(0))
  # Each member's values at the response's last scored position (found here with numpy),
  # averaged in float64.
  w = np.asarray(ro['weights'])
  last = [int(np.nonzero(row)[0][-1]) for row in w]
  per_member = [np.asarray(nnx.jit(lambda m, x: m.values(x))(models[name], ro['inputs']),
                           np.float64)[np.arange(2), last] for name in names]
  assert np.ptp([m[0] for m in per_member]) > 1e-3   # the members disagree
  np.testing.assert_allclose(ro['score'], np.mean(per_member, axis=0), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- runs on a tiny SFT


@pytest.fixture
def sft(alignment_sft):
  return alignment_sft


@pytest.fixture(scope='module')
def reward_run(alignment_sft):
  sft_dir, pairs_dir, root = alignment_sft
  workdir = str(root / 'reward_for_rlhf')
  loop.train(alignment_config(reward_gpt, sft_dir, pairs_dir, eval_every=0, total_steps=2),
             workdir, devices=jax.devices()[:1])
  return workdir


def rlhf_config(sft_dir, pairs_dir, reward_dir, **overrides):
  return alignment_config(rlhf_gpt, sft_dir, pairs_dir, **{
      'rlhf.reference': sft_dir, 'rlhf.reward': reward_dir, 'eval_every': 0, **overrides})


@needs_multi30k
def test_rlhf_run_equals_on_8_devices_and_resumes_exactly(sft, reward_run):
  sft_dir, pairs_dir, root = sft
  config = lambda **o: rlhf_config(sft_dir, pairs_dir, reward_run, **o)
  one = loop.train(config(log_every=1), str(root / 'rlhf1'), devices=jax.devices()[:1])
  logged = {row['step']: row for row in one.history if 'kl' in row}
  assert all(k in logged[1] for k in (
      'reward', 'entropy', 'clip_fraction', 'value_loss', 'kl_sampled', 'policy_loss'))
  # Step 1 samples from the policy before any update: it is the reference (both the SFT run),
  # so the KL is 0; the updates then move it away.
  assert abs(logged[1]['kl']) < 1e-5 and abs(logged[1]['kl_sampled']) < 1e-5
  assert logged[4]['kl'] > 1e-4
  eight = loop.train(config(**{'mesh.data': 8, 'total_steps': 2}), str(root / 'rlhf8'))
  np.testing.assert_allclose([eight.step_losses[s] for s in (1, 2)],
                             [one.step_losses[s] for s in (1, 2)], rtol=1e-4, atol=1e-6)
  # Resumed from the uninterrupted run's step-2 checkpoint (a copy without the later ones).
  workdir = str(root / 'rlhf_resumed')
  shutil.copytree(str(root / 'rlhf1'), workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  second = loop.train(config(), workdir, devices=jax.devices()[:1])
  assert_resumed_exactly(second, one)


ADAPTIVE = {'rlhf.target_kl': 0.02, 'rlhf.kl_gain': 0.5}


@pytest.fixture(scope='module')
def adaptive_run(alignment_sft, reward_run):
  """A 4-step RLHF run with an adaptive beta: (its directory, the loop's result)."""
  sft_dir, pairs_dir, root = alignment_sft
  workdir = str(root / 'rlhf_adaptive')
  run = loop.train(rlhf_config(sft_dir, pairs_dir, reward_run, log_every=1, **ADAPTIVE),
                   workdir, devices=jax.devices()[:1])
  return workdir, run


@needs_multi30k
def test_an_adaptive_beta_follows_the_logged_kl_and_resumes_exactly(sft, reward_run,
                                                                     adaptive_run):
  sft_dir, pairs_dir, root = sft
  target, gain = ADAPTIVE['rlhf.target_kl'], ADAPTIVE['rlhf.kl_gain']
  run_dir, run = adaptive_run
  rows = {row['step']: row for row in run.history if 'beta' in row}
  assert sorted(rows) == [1, 2, 3, 4]
  np.testing.assert_allclose(rows[1]['beta'], 0.1, rtol=1e-6)   # the config's beta first
  for s in (1, 2, 3):   # then each step's beta from the previous step's KL, by hand
    e = min(max(rows[s]['kl'] / target - 1, -0.2), 0.2)
    np.testing.assert_allclose(rows[s + 1]['beta'], rows[s]['beta'] * (1 + gain * e),
                               rtol=1e-5)
  assert rows[2]['beta'] < rows[1]['beta']   # step 1's KL is 0 (policy = reference): lowered
  # The coefficient is train state: a run resumed at step 2 goes on with it, bit for bit.
  workdir = str(root / 'rlhf_adaptive_resumed')
  shutil.copytree(run_dir, workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  resumed = loop.train(rlhf_config(sft_dir, pairs_dir, reward_run, log_every=1, **ADAPTIVE),
                       workdir, devices=jax.devices()[:1])
  assert_resumed_exactly(resumed, run)
  assert [r['beta'] for r in resumed.history if 'beta' in r] == [rows[3]['beta'], rows[4]['beta']]


@needs_multi30k
def test_an_ensemble_of_one_reward_run_twice_trains_as_that_run_alone(sft, reward_run):
  sft_dir, pairs_dir, root = sft
  config = lambda reward: rlhf_config(sft_dir, pairs_dir, reward, total_steps=2, log_every=1,
                                      checkpoint_every=0)
  alone = loop.train(config(reward_run), str(root / 'rlhf_alone'), devices=jax.devices()[:1])
  twice = loop.train(config(f'{reward_run},{reward_run}'), str(root / 'rlhf_twice'),
                     devices=jax.devices()[:1])
  np.testing.assert_allclose([twice.step_losses[s] for s in (1, 2)],
                             [alone.step_losses[s] for s in (1, 2)], rtol=1e-5, atol=1e-7)


@needs_multi30k
def test_grouped_batches_answer_each_prompt_k_times(sft, reward_run):
  sft_dir, pairs_dir, _ = sft
  family = rlhf_lib.RLHFFamily(rlhf_config(sft_dir, pairs_dir, reward_run,
                                           **{'rlhf.group_size': 4}))
  family.setup_data(0, 1)
  batch = family.train_batch(3)
  prompts = batch['prompts'].reshape(2, 4, -1)
  assert (prompts == prompts[:, :1]).all() and not (prompts[0] == prompts[1]).all()
  # Distinct global rows, so each answer draws from its own key (rollout_keys).
  np.testing.assert_array_equal(batch['rows'], np.arange(8))


@needs_multi30k
def test_bad_rlhf_inputs_are_one_line(sft, reward_run):
  sft_dir, pairs_dir, root = sft
  fails_in_one_line(rlhf_config(sft_dir, pairs_dir, reward_run, **{'rlhf.beta': -0.1}),
                    r'config.rlhf.beta=-0.1: must be > 0')
  fails_in_one_line(rlhf_config(sft_dir, pairs_dir, reward_run, **{'rlhf.value_lr_scale': 0.0}),
                    r'config.rlhf.value_lr_scale=0.0: must be > 0')
  fails_in_one_line(rlhf_config(sft_dir, pairs_dir, reward_run,
                                **{'rlhf.reference_logp_weight': -1.0}),
                    r'config.rlhf.reference_logp_weight=-1.0: must be >= 0')
  for key, value in (('target_kl', -1.0), ('kl_gain', 0.0)):
    fails_in_one_line(rlhf_config(sft_dir, pairs_dir, reward_run, **{f'rlhf.{key}': value}),
                      rf'config.rlhf.target_kl=.*config.rlhf.kl_gain=.*: the target must be '
                      r'>= 0 \(0: beta fixed\) and the gain in \(0, 1\]')
  for group in (0, 3):
    fails_in_one_line(rlhf_config(sft_dir, pairs_dir, reward_run, **{'rlhf.group_size': group}),
                      rf'config.rlhf.group_size={group}: must be >= 1 and divide '
                      r'config.batch_size=8')
  fails_in_one_line(rlhf_config(sft_dir, pairs_dir, str(root / 'none')),
                    r'config.rlhf.reward=.*none: no checkpoint', str(root / 'bad_rlhf'))
  # An ensemble's member without checkpoints is named alone.
  fails_in_one_line(rlhf_config(sft_dir, pairs_dir, f'{reward_run},{root / "none"}'),
                    r'config.rlhf.reward=[^,]*none: no checkpoint', str(root / 'bad_rlhf2'))
  other = run_with_another_tokenizer(sft_dir, str(root / 'other_tokenizer_rlhf'))
  fails_in_one_line(rlhf_config(sft_dir, pairs_dir, reward_run, **{'rlhf.reference': other}),
                    r'config.rlhf.reference=.*other_tokenizer_rlhf: its tokenizer differs')


@needs_multi30k
def test_compare_alignment_sft_temperature_rows_and_prompt_split(sft, reward_run, adaptive_run,
                                                                  tmp_path):
  sft_dir, pairs_dir, _ = sft
  ppo_dir, ppo = adaptive_run
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def compare(out, *flags):
    return subprocess.run(
        [sys.executable, '-m', 'experiments.compare_alignment', f'--pairs={pairs_dir}',
         f'--sft={sft_dir}', f'--reward={reward_run}', '--prompt_len=64', '--max_new_tokens=8',
         f'--out_dir={out}', *flags],
        cwd=root, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'})

  out = tmp_path / 'compare'
  bad = compare(out, '--sft_temperatures=0.8,hot')
  assert bad.returncode == 1 and not out.exists()
  assert bad.stderr.strip().splitlines()[-1].endswith(
      "--sft_temperatures=0.8,hot: 'hot' is not a temperature >= 0"), bad.stderr[-2000:]
  done = compare(out, '--sft_temperatures=1,0', f'--ppo={ppo_dir}', '--split=validation')
  assert done.returncode == 0, done.stderr[-2000:]
  report = json.loads((out / 'alignment.json').read_text(encoding='utf-8'))
  rows = report['rows']
  assert [r['model'] for r in rows] == ['SFT', 'SFT at temperature 1', 'SFT at temperature 0',
                                        'PPO']
  # The adaptive run's row: its config's beta and the one its last step left in its state.
  final = float(ppo.state['rest']['kl_control']['beta'][...])
  assert rows[3]['beta'] == 0.1 and rows[3]['final_beta'] == pytest.approx(final, rel=1e-6)
  table = (out / 'alignment.md').read_text('utf-8')
  assert f'| PPO | 0.1 -> {final:.3g} (adaptive) |' in table
  # The same model at the same temperature draws the same responses (one key per prompt).
  assert rows[1]['examples'] == rows[0]['examples'] and rows[1]['win_rate'] == 50.0
  # Temperature 0 is greedy: the first prompt's response equals an argmax decode by full
  # recompute (no KV cache), written here; --split picks whose prompts those are.
  _, models, _ = run_loader.load_models(sft_dir)
  tokenizer = text_lib.load_from_workdir(sft_dir)
  _, splits = preferences.load(pairs_dir)

  def greedy(split):
    records = [r for r in splits[split] if len(r['prompt_ids']) <= 64]
    ids, new = list(records[0]['prompt_ids']), []
    for _ in range(8):
      token = int(np.argmax(np.asarray(models['model'](jnp.asarray([ids])))[0, -1]))
      if token == text_lib.EOS_ID:
        break
      ids.append(token)
      new.append(token)
    return records, tokenizer.decode(new).strip()

  records, response = greedy('validation')
  assert report['split'] == 'validation' and report['prompts'] == len(records)
  assert rows[2]['examples'][0]['input'] == records[0]['input']
  assert rows[2]['examples'][0]['response'] == response
  assert table.startswith(f'{len(records)} validation prompts of ')
  assert rows[2]['temperature'] == 0.0 and rows[0]['temperature'] == 1.0
  # The default: the test prompts.
  done = compare(tmp_path / 'test_split', '--sft_temperatures=0', '--num_prompts=1')
  assert done.returncode == 0, done.stderr[-2000:]
  report = json.loads((tmp_path / 'test_split' / 'alignment.json').read_text(encoding='utf-8'))
  validation_input = records[0]['input']
  records, response = greedy('test')
  assert report['split'] == 'test' and report['prompts'] == 1
  assert records[0]['input'] != validation_input   # so the two runs did read other prompts
  assert report['rows'][1]['examples'][0]['input'] == records[0]['input']
  assert report['rows'][1]['examples'][0]['response'] == response


@needs_multi30k
def test_pair_accuracy_counts_agreement_as_computed_here(sft, reward_run, tmp_path):
  sft_dir, pairs_dir, _ = sft
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def run(*flags):
    return subprocess.run(
        [sys.executable, '-m', 'experiments.pair_accuracy', f'--pairs={pairs_dir}',
         f'--sft={sft_dir}', f'--reward={reward_run},{reward_run}', *flags],
        cwd=root, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'})

  bad = run('--weights=1,-2')
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].endswith("--weights=1,-2: '-2' is not a weight > 0")
  # A copy of the reward run whose tokenizer swaps two tokens' ids: as many, other ids.
  other = tmp_path / 'other_ids'
  shutil.copytree(reward_run, other)
  tokenizer = json.loads((other / text_lib.TOKENIZER_FILE).read_text('utf-8'))
  vocab = tokenizer['model']['vocab']
  (a, ia), (b, ib) = list(vocab.items())[-2:]
  vocab[a], vocab[b] = ib, ia
  (other / text_lib.TOKENIZER_FILE).write_text(json.dumps(tokenizer), 'utf-8')
  for reward, message in ((sft_dir, "a 'gpt_instruct' run, not a reward run"),
                          (str(other), 'its tokenizer differs from --sft=')):
    bad = run(f'--reward={reward}')
    assert bad.returncode == 1, bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines()[-1].startswith(f'error: --reward={reward}: {message}')
  done = run('--weights=3', '--split=train')   # 40 pairs (8 in validation)
  assert done.returncode == 0, done.stderr[-2000:]
  printed = dict(re.findall(r'^\| (.+?) \| ([0-9.]+) \+- [0-9.]+ \|$', done.stdout, re.M))
  # Each train pair scored here one response at a time, unpadded: the SFT model's
  # log-softmax picked at the response's tokens and [EOS], averaged; the reward model's score
  # where the response's last token is the input.
  _, sft_models, _ = run_loader.load_models(sft_dir)
  reward = run_loader.load_models(reward_run)[1]['model']
  _, splits = preferences.load(pairs_dir)
  agree = {'logp': [], 'reward': [], 'both': [], 'chrf': []}
  for r in splits['train']:
    good, bad_ids = r['response_ids'][r['chosen']], r['response_ids'][1 - r['chosen']]
    if good == bad_ids:
      continue
    values = []
    for response in (good, bad_ids):
      ids = np.asarray(list(r['prompt_ids']) + list(response))
      logits = np.asarray(sft_models['model'](jnp.asarray(ids[None, :-1])))[0].astype(np.float64)
      logp = logits - logits.max(-1, keepdims=True)
      logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
      picked = logp[np.arange(len(ids) - 1), ids[1:]][len(r['prompt_ids']) - 1:]
      score = float(reward.score(jnp.asarray(ids[None, :-1]), jnp.asarray([len(ids) - 2]))[0])
      values.append((picked.mean(), score))
    (lg, sg), (lb, sb) = values
    agree['logp'].append(lg > lb)
    agree['reward'].append(sg > sb)
    agree['both'].append(sg + 3 * lg > sb + 3 * lb)
    agree['chrf'].append(r['chrf'][r['chosen']] > r['chrf'][1 - r['chosen']])
  assert done.stdout.startswith(f'{len(agree["logp"])} train pairs of ')
  for name, key in (('reward models (mean score)', 'reward'), ('SFT mean token log-prob', 'logp'),
                    ('reward + 3 x SFT mean log-prob', 'both'),
                    ('higher sentence chrF (the judge before its noise)', 'chrf')):
    assert float(printed[name]) == pytest.approx(100 * np.mean(agree[key]), abs=0.051), name
