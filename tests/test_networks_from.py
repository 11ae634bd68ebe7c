"""Family.networks_from_runs: whole networks a family takes, frozen, from other runs (a
distillation teacher, a DPO reference), loaded by the loop (train/tune.py `load_networks`)."""

import os

import jax.numpy as jnp
import pytest
from flax import nnx

from tests import toy_families
from tests.test_tune import leaves_by_path, saved_array_paths, toy
from train import families
from train import loop
from train import run_loader
from train.errors import UserError


class ToyStudent(toy_families.ToyRegression):
  """Fits a frozen 'teacher' MLP (another toy_regression run's 'model') instead of sin(x)."""
  name = 'toy_student'

  def make_models(self, rngs):
    return {'model': toy_families.MLP(1, self.config.hidden, 1, rngs=rngs),
            'teacher': toy_families.MLP(1, self.config.teacher_hidden, 1, rngs=rngs)}

  def networks_from_runs(self):
    return {'teacher': (self.config.teacher, 'model', 'config.teacher')}

  def loss(self, models, batch, rng, *, train):
    return jnp.mean((models['model'](batch['x']) - models['teacher'](batch['x'])) ** 2), {}


families.register('toy_student', 'tests.test_networks_from:ToyStudent')


def student(teacher_dir, **overrides):
  return toy(**{'family': 'toy_student', 'teacher': teacher_dir, 'teacher_hidden': 32,
                'seed': 1, **overrides})


def assert_same(got, want):
  got, want = leaves_by_path(got), leaves_by_path(want)
  assert sorted(got) == sorted(want)
  for path, value in want.items():
    assert got[path].tobytes() == value.tobytes(), path


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('teacher'))
  return directory, loop.train(toy(total_steps=4), directory)


def test_the_teacher_is_its_runs_model_and_stays_frozen(teacher, tmp_path):
  teacher_dir, teacher_run = teacher
  run = loop.train(student(teacher_dir, total_steps=8), str(tmp_path / 'student'))
  # Bit for bit the teacher run's final weights (as that run's own result holds them), still
  # after 8 steps; the student moved towards it.
  assert_same(run.state['params']['teacher'], teacher_run.state['params']['model'])
  assert 'teacher' not in run.state['opt']
  losses = [h['loss'] for h in run.history if 'loss' in h]
  assert losses[-1] < 0.5 * losses[0], losses


def test_resume_and_trained_only_checkpoints_reload_the_teacher(teacher, tmp_path):
  teacher_dir, teacher_run = teacher
  # init_from the teacher run too, training only l2: checkpoints hold what trained, neither the
  # frozen l1 nor the teacher (the meta names both runs).
  tuned = {'init_from': teacher_dir, 'trainable': r'^model/l2/'}
  full = loop.train(student(teacher_dir, total_steps=6, **tuned), str(tmp_path / 'full'))
  half_dir = str(tmp_path / 'half')
  loop.train(student(teacher_dir, total_steps=3, checkpoint_every=3, **tuned), half_dir)
  saved = saved_array_paths(os.path.join(half_dir, 'checkpoints', '3'))
  assert not any(p.startswith('params/teacher') or '/l1/' in p for p in saved), saved
  resumed = loop.train(student(teacher_dir, total_steps=6, **tuned), half_dir)
  assert_same(resumed.state['params'], full.state['params'])
  assert_same(resumed.state['params']['teacher'], teacher_run.state['params']['model'])
  _, models, _ = run_loader.load_models(half_dir)
  assert_same(nnx.state(models['teacher'], nnx.Param), teacher_run.state['params']['model'])


def test_bad_teacher_runs_are_one_line(teacher, tmp_path):
  teacher_dir, _ = teacher
  with pytest.raises(UserError, match=r'^config.teacher=/nowhere: no checkpoint') as e:
    loop.train(student('/nowhere'), str(tmp_path / 'a'))
  assert '\n' not in str(e.value)
  with pytest.raises(UserError, match=r'^config.teacher=.*do not fit this model \('
                                      r'params/model/l1/bias: \[32\] in the base run, \[16\] here'):
    loop.train(student(teacher_dir, teacher_hidden=16), str(tmp_path / 'b'))
  assert not os.path.exists(tmp_path / 'b' / 'checkpoints' / '6')
