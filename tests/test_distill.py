"""Knowledge distillation (train/families/distill_gpt.py): the KL term against its definition and
Hinton et al.'s high-temperature limit, and end to end on Tiny Shakespeare: a frozen teacher
from another run, 8 devices equal one, exact resume, the student scored like a GPT run."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import distill_gpt as distill_config
from experiments.configs import gpt_shakespeare
from models import gpt
from tests.test_sharding import three_steps
from tests.test_tune import leaves_by_path
from train import loop
from train import run_loader
from train.errors import UserError
from train.families import distill_gpt

needs_tfds = pytest.mark.skipif(not os.environ.get('TFDS_DATA_DIR'),
                                reason='TFDS_DATA_DIR (a prepared data_dir) is not set')

VOCAB = 23


def family(**overrides):
  c = distill_config.get_config('tiny')
  c.update_from_flattened_dict({'distill.teacher': '/unused', **overrides})
  return distill_gpt.DistillGPTFamily(c)


def tiny_gpt(seed, width=16):
  return gpt.GPT(vocab_size=VOCAB, block_size=8, num_layers=2, num_heads=2, embed_dim=width,
                 rngs=nnx.Rngs(seed))


def batch():
  ids = jax.random.randint(jax.random.key(5), (2, 9), 0, VOCAB, dtype=jnp.int32)
  return {'inputs': ids[:, :-1], 'targets': ids[:, 1:]}


# ------------------------------------------------------------------------------ the loss


def test_kl_is_zero_when_the_student_is_the_teacher():
  student = tiny_gpt(0)
  same = nnx.merge(*nnx.split(tiny_gpt(0)))  # another module, the same weights
  other = tiny_gpt(1, width=32)
  f = family(**{'distill.alpha': 0.25, 'distill.temperature': 3.0})
  # One compiled program per call instead of op-by-op dispatch (much faster on CPU).
  f_loss = nnx.jit(lambda models, train: f.loss(models, batch(), None, train=train),
                   static_argnums=1)
  forward = nnx.jit(lambda model: model(batch()['inputs']))
  loss, m = f_loss({'model': student, 'teacher': same}, True)
  assert float(m['kl']) == 0.0
  np.testing.assert_allclose(float(loss), 0.25 * float(m['ce']), rtol=1e-6)
  # The CE is the labels' cross-entropy, written out in numpy.
  logits = np.asarray(forward(student), np.float64)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(log_p, np.asarray(batch()['targets'])[..., None], -1).mean()
  np.testing.assert_allclose(float(m['ce']), ce, rtol=1e-5)
  # Another teacher: the KL is sum p_t (log p_t - log p_s) at T = 3 (numpy), and enters the
  # loss with weight (1 - alpha) T^2.
  loss, m = f_loss({'model': student, 'teacher': other}, True)
  soft = lambda z: np.exp(z / 3.0) / np.exp(z / 3.0).sum(-1, keepdims=True)
  p_t = soft(np.asarray(forward(other), np.float64))
  p_s = soft(logits)
  kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(-1).mean()
  assert kl > 1e-3
  np.testing.assert_allclose(float(m['kl']), kl, rtol=1e-4)
  np.testing.assert_allclose(float(loss), 0.25 * ce + 0.75 * 9.0 * kl, rtol=1e-4)
  # Eval (train=False) is the student's CE alone, as in a GPT run.
  eval_loss, _ = f_loss({'model': student, 'teacher': other}, False)
  np.testing.assert_allclose(float(eval_loss), ce, rtol=1e-5)


def test_t_squared_keeps_the_soft_gradient_comparable_across_t():
  # Hinton et al. 2015, section 2.1: for large T and zero-mean logits, the gradient of the
  # soft cross-entropy (equally of the KL) w.r.t. student logit z_i is (z_i - v_i) / (N T^2),
  # so T^2 * KL has gradient (z - v) / N whatever T.
  n = 64
  z = jax.random.normal(jax.random.key(0), (n,))
  v = jax.random.normal(jax.random.key(1), (n,))
  z, v = z - z.mean(), v - v.mean()
  limit = np.asarray((z - v) / n)
  grads = {}
  for t in (1.0, 4.0, 30.0, 300.0):
    grads[t] = np.asarray(jax.grad(lambda s: t ** 2 * distill_gpt.distillation_kl(s, v, t))(z))
  errors = {t: np.linalg.norm(g - limit) / np.linalg.norm(limit) for t, g in grads.items()}
  assert errors[300.0] < 5e-3 and errors[30.0] < 0.05, errors
  assert errors[300.0] < errors[30.0] < errors[4.0] < errors[1.0], errors
  norms = [np.linalg.norm(g) for g in grads.values()]
  assert max(norms) / min(norms) < 1.25, norms  # without T^2: 300^2 apart


# ------------------------------------------------------------------------------ end to end


def teacher_config(**overrides):
  c = gpt_shakespeare.get_config('tiny')
  c.update_from_flattened_dict({'total_steps': 2, 'eval_every': 0, 'checkpoint_every': 0,
                                **overrides})
  return c


def student_config(teacher_dir='/unused', **overrides):
  c = distill_config.get_config('tiny')
  c.update_from_flattened_dict({'distill.teacher': teacher_dir, 'total_steps': 4,
                                'log_every': 1, 'eval_every': 4, 'checkpoint_every': 0,
                                'sample_tokens': 4, **overrides})
  return c


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('teacher'))
  return directory, loop.train(teacher_config(), directory, devices=jax.devices()[:1])


def assert_bit_equal(got, want):
  got, want = leaves_by_path(got), leaves_by_path(want)
  assert sorted(got) == sorted(want)
  for path, value in want.items():
    assert got[path].tobytes() == value.tobytes(), path


@needs_tfds
def test_distill_run_resumes_exactly_and_reads_like_a_gpt_run(teacher, tmp_path):
  teacher_dir, teacher_run = teacher
  one = jax.devices()[:1]
  straight = loop.train(student_config(teacher_dir), str(tmp_path / 'straight'), devices=one)
  history = [h for h in straight.history if 'kl' in h]
  assert {'ce', 'kl', 'loss'} <= set(history[0]) and history[0]['kl'] > 0
  for h in history:  # loss = a CE + (1 - a) T^2 KL, with a 0.5 and T 2
    np.testing.assert_allclose(h['loss'], 0.5 * h['ce'] + 0.5 * 4.0 * h['kl'], rtol=1e-5)
  assert_bit_equal(straight.state['params']['teacher'], teacher_run.state['params']['model'])
  assert 'teacher' not in straight.state['opt']

  # Interrupted after 2 steps, resumed in a fresh call: bit for bit the straight run.
  resumed_dir = str(tmp_path / 'resumed')
  loop.train(student_config(teacher_dir, total_steps=2, eval_every=0), resumed_dir, devices=one)
  # The teacher comes from the checkpoint now: its directory is not read again.
  resumed = loop.train(student_config('/moved/away', eval_every=0), resumed_dir, devices=one)
  assert sorted(resumed.step_losses) == [3, 4]
  assert resumed.step_losses[4] == straight.step_losses[4]
  assert_bit_equal(resumed.state['params'], straight.state['params'])
  assert_bit_equal(resumed.state['opt'], straight.state['opt'])

  # The run directory reads like a GPT run's: eval/loss is the student's CE, which
  # train.sample's models (the student as 'model') reproduce.
  eval_row = [h for h in straight.history if 'eval/loss' in h][-1]
  f, models, step = run_loader.load_models(str(tmp_path / 'straight'))
  assert step == 4 and f.name == 'distill_gpt'
  f.setup_data(0, 1)
  ces = [float(f.loss({'model': models['model']}, b, None, train=False)[0])
         for b in f.eval_batches()]
  np.testing.assert_allclose(eval_row['eval/loss'], np.mean(ces), rtol=1e-5)


@needs_tfds
def test_distill_step_on_8_devices_equals_one():
  # The loop's jitted step (student forward and backward, teacher forward) with SGD, whose
  # params expose any gradient difference (Adam's g / sqrt(v) blows up float noise in tiny
  # gradients); the teacher is the jitted init's, the same on both meshes.
  sgd = {'optimizer.name': 'sgd', 'optimizer.momentum': 0.9,
         'optimizer.schedule': 'constant', 'optimizer.lr': 0.5, 'optimizer.warmup_steps': 0,
         'optimizer.grad_clip': 0.0}
  ref_losses, init_state, ref_state = three_steps(student_config(**sgd), jax.devices()[:1])
  assert ref_losses[2] < ref_losses[0] - 0.01, ref_losses  # it learns
  losses, _, state = three_steps(student_config(**sgd, **{'mesh.data': 2, 'mesh.fsdp': 4}),
                                 init_state=init_state)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.device_get(state['params']), jax.device_get(ref_state['params']))


@needs_tfds
def test_bad_distill_inputs_are_one_line(teacher, tmp_path):
  teacher_dir, _ = teacher
  # A teacher on another vocabulary (its family.json lists other characters).
  other = str(tmp_path / 'other_vocab')
  shutil.copytree(teacher_dir, other)
  with open(os.path.join(other, 'family.json'), encoding='utf-8') as f:
    chars = json.load(f)['chars']
  with open(os.path.join(other, 'family.json'), 'w', encoding='utf-8') as f:
    json.dump({'chars': chars[:-1]}, f)
  with pytest.raises(UserError, match=r'^config.distill.teacher=.*family.json') as e:
    loop.train(student_config(other), str(tmp_path / 'a'), devices=jax.devices()[:1])
  assert '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'a' / 'checkpoints' / '4')
  with pytest.raises(UserError, match=r'^config.distill.teacher: not set') as e:
    loop.train(student_config(''), str(tmp_path / 'b'))
  with pytest.raises(UserError, match=r'^config.distill.alpha=1.5: must be in \[0, 1\]'):
    loop.train(student_config(teacher_dir, **{'distill.alpha': 1.5}), str(tmp_path / 'c'))
