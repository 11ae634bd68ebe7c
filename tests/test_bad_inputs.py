"""Every bad input is one line naming the culprit (a UserError; the CLIs print it and exit 1)
and writes nothing; bfloat16 activations in every image family."""

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import classifier_mnist, ddpm_mnist, gan_mnist, gpt_shakespeare, vae_mnist
from tests import toy_families
from train import config as config_lib
from train import evaluate
from train import families
from train import loop
from train import run_loader
from train import sharding as sharding_lib
from train.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_line(excinfo, *fragments):
  message = str(excinfo.value)
  assert '\n' not in message, message
  for fragment in fragments:
    assert fragment in message, message


def run_cli(*args):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=False)


def assert_cli_one_line(proc, *fragments):
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert 'Traceback' not in proc.stderr, proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1, proc.stderr
  for fragment in fragments:
    assert fragment in errors[0], errors[0]


# ---- the command line, end to end (one process each: kept to the cheap ones) ----
def test_cli_config_errors_are_one_line_and_write_nothing(tmp_path):
  bad = tmp_path / 'bad_config.py'
  bad.write_text('def get_config(arg=None):\n  return {"family": "gpt"}\n')
  workdir = tmp_path / 'run'
  assert_cli_one_line(run_cli('train', f'--config={bad}', f'--workdir={workdir}'),
                      'get_config(None) returned a dict, not an ml_collections.ConfigDict')
  config = os.path.join(ROOT, 'experiments/configs/gpt_shakespeare.py:tiny')
  assert_cli_one_line(run_cli('train', f'--config={config}', f'--workdir={workdir}',
                              '--config.model.num_heads=none'),
                      '--config.model.num_heads=none', 'expected int')
  assert_cli_one_line(run_cli('train', f'--config={config}', f'--workdir={workdir}',
                              '--config.total_steps=0'), 'config.total_steps=0', 'positive')
  assert not workdir.exists()


def test_cli_damaged_run_files_are_one_line(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text('{"family": "gpt", "model": {')
  (workdir / 'family.json').write_text('{}')
  before = sorted(os.listdir(workdir))
  assert_cli_one_line(run_cli('train.sample', f'--workdir={workdir}'),
                      f'--workdir={workdir}', 'config.json is damaged (not JSON')
  # train.evaluate reads the evaluated run first (its family decides what else it needs).
  assert_cli_one_line(run_cli('train.evaluate', f'--workdir={workdir}', f'--classifier={workdir}'),
                      f'--workdir={workdir}', 'config.json is damaged')
  assert sorted(os.listdir(workdir)) == before


def test_cli_unreadable_array_is_one_line_naming_it(tmp_path):
  """A checkpoint whose arrays cannot be read: Orbax raises while the other reads are in
  flight, and their leftovers (tracebacks of a closed event loop, never-retrieved futures) once
  followed the error. Now stderr is the error alone, naming the array, for a run's own
  checkpoint and for a base run read by `init_from`; the damaged checkpoint is kept."""
  config = gpt_shakespeare.get_config('tiny')
  workdir = tmp_path / 'run'
  loop.train(config, str(workdir))
  step = config.total_steps
  data = glob.glob(str(workdir / f'checkpoints/{step}/state/ocdbt.process_0/d/*'))
  assert data
  for path in data:
    with open(path, 'wb') as f:
      f.write(b'garbage')
  for proc, culprit in [
      (run_cli('train.sample', f'--workdir={workdir}'), f'checkpoint {workdir}/checkpoints/{step}'),
      (run_cli('train', f'--config={ROOT}/experiments/configs/gpt_shakespeare.py:tiny',
               f'--workdir={tmp_path / "tuned"}', f'--config.init_from={workdir}'),
       f'config.init_from={workdir}: checkpoint {step}')]:
    assert_cli_one_line(proc, culprit, 'cannot be restored', 'Error reading "', '.value/')
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
  kept = glob.glob(str(workdir / f'checkpoints/{step}/state/ocdbt.process_0/d/*'))
  assert sorted(kept) == sorted(data)


# ---- the same checks, in process ----
def test_get_config_must_return_a_config_dict(tmp_path):
  path = tmp_path / 'c.py'
  path.write_text('def get_config(arg=None):\n  return None\n')
  with pytest.raises(UserError) as e:
    config_lib.load(str(path))
  one_line(e, 'returned a NoneType, not an ml_collections.ConfigDict')


@pytest.mark.parametrize('arg, fragment', [
    ('long,tiny', 'long and tiny together'),
    ('cond,longer', "unknown ARG ['longer']"),
])
def test_config_args_that_contradict_or_do_not_exist(arg, fragment):
  path = os.path.join(ROOT, 'experiments/configs/ddpm_mnist.py')
  with pytest.raises(UserError) as e:
    config_lib.load(f'{path}:{arg}')
  one_line(e, f'rejects argument {arg!r}', fragment)


def test_none_only_for_optional_keys():
  config = gpt_shakespeare.get_config('tiny')
  with pytest.raises(UserError) as e:
    config_lib.apply_overrides(config, [('model.num_heads', 'none')])
  one_line(e, '--config.model.num_heads=none', 'expected int')
  # Optional keys (None by default: placeholders) still take none.
  config_lib.apply_overrides(config, [('model.init_std', 'none')])
  assert config.model.init_std is None


@pytest.mark.parametrize('name, text, fragment', [
    ('config.json', '{"family": ', 'config.json is damaged (not JSON'),
    ('config.json', '[1, 2]', 'config.json is damaged (a JSON list, not an object)'),
    ('config.json', '{"model": {}}', 'config.json is damaged (it names no `family`)'),
    ('family.json', 'garbage', 'family.json is damaged (not JSON'),
    ('family.json', None, 'no family.json'),
])
def test_damaged_run_files(tmp_path, name, text, fragment):
  files = {'config.json': config_lib.to_json(gpt_shakespeare.get_config('tiny')),
           'family.json': json.dumps({'chars': 'ab'})}
  files[name] = text
  for file, content in files.items():
    if content is not None:
      (tmp_path / file).write_text(content)
  with pytest.raises(UserError) as e:
    run_loader.load_models(str(tmp_path))
  one_line(e, f'--workdir={tmp_path}', fragment)


def test_family_config_errors():
  cases = [  # (config, key path, bad value, what the message says it must be)
      (gpt_shakespeare, ('eval_batches',), 0, '>= 1'),
      (ddpm_mnist, ('sampling', 'batch'), 0, '>= 1'),
      (ddpm_mnist, ('model', 'dropout_bits'), 12, '(8, 16, 32)'),
      (gpt_shakespeare, ('model', 'dropout_bits'), 0, '(8, 16, 32)'),
  ]
  for module, path, value, must in cases:
    config = module.get_config('tiny')
    group = config
    for key in path[:-1]:
      group = group[key]
    group[path[-1]] = value
    with pytest.raises(UserError) as e:
      families.get(config.family)(config)
    one_line(e, f'config.{".".join(path)}={value}', must)

  for get_config in (vae_mnist.get_config, gan_mnist.get_config, classifier_mnist.get_config):
    config = get_config('tiny')
    config.model.dtype = 'float16'
    with pytest.raises(UserError) as e:
      families.get(config.family)(config)
    one_line(e, "config.model.dtype='float16'", 'bfloat16')


def test_image_sample_and_evaluate_counts(tmp_path):
  family = families.get('vae')(vae_mnist.get_config('tiny'))
  family.load_metadata({'image_shape': [28, 28, 1], 'class_names': list('0123456789')})
  with pytest.raises(UserError) as e:
    family.sample(None, jax.random.key(0), str(tmp_path), {'num_samples': 0})
  one_line(e, '--num_samples=0', '>= 1')
  with pytest.raises(UserError) as e:
    evaluate.evaluate(str(tmp_path), None, num_samples=3, k=3)
  one_line(e, '--num_samples=3', '--pr_k=3')
  assert os.listdir(tmp_path) == []


def test_missing_data_directory_stops_the_test_run_with_one_line(tmp_path):
  (tmp_path / 'test_x.py').write_text('def test_x():\n  pass\n')
  missing = tmp_path / 'no_such_dir'
  for var in ('TFDS_DATA_DIR', 'GENLAB_RAW_DATA'):
    proc = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
         f'--confcutdir={ROOT}/tests', '-c', os.devnull, '--rootdir', str(tmp_path),
         '-p', 'tests.conftest', str(tmp_path / 'test_x.py')],
        cwd=ROOT, env={**os.environ, var: str(missing)}, capture_output=True, text=True,
        timeout=120, check=False)
    assert proc.returncode != 0, proc.stdout
    errors = [l for l in (proc.stdout + proc.stderr).splitlines() if l.startswith('ERROR')]
    assert errors == [f'ERROR: {var}={missing}: no such directory ({missing}); point it at '
                      + errors[0].split('point it at ')[1]], proc.stdout + proc.stderr


def test_loop_input_errors_write_nothing(tmp_path):
  workdir = tmp_path / 'run'
  cases = [
      ({'total_steps': 0}, ['config.total_steps=0', 'positive']),
      ({'sharding.divides': (('tensor', 'model.width'),)},
       ["('tensor', 'model.width')", 'config.model.width, which does not exist']),
      ({'sharding.rules': (('l3/kernel$', (None, 'tensor')),)},
       ["config.sharding.rules[0]: 'l3/kernel$' matches no parameter",
        "'params/model/l1/bias'"]),
  ]
  for overrides, fragments in cases:
    config = toy_families.regression_config()
    config.update_from_flattened_dict(overrides)
    with pytest.raises(UserError) as e:
      loop.train(config, str(workdir))
    one_line(e, *fragments)
    assert not workdir.exists()


def test_read_only_run_directory(tmp_path):
  if os.geteuid() == 0:
    workdir = '/sys'  # root writes anywhere chmod allows; sysfs refuses new files even to root
  else:
    workdir = str(tmp_path / 'run')
    loop.train(toy_families.regression_config(total_steps=2), workdir)
    for path, dirs, _ in os.walk(workdir):
      for d in dirs:
        os.chmod(os.path.join(path, d), 0o555)
    os.chmod(workdir, 0o555)
  before = sorted(os.listdir(workdir))
  with pytest.raises(UserError) as e:
    loop.train(toy_families.regression_config(total_steps=4), workdir)
  one_line(e, f'--workdir={workdir}: cannot write in it')
  assert sorted(os.listdir(workdir)) == before


@pytest.mark.parametrize('get_config', [vae_mnist.get_config, gan_mnist.get_config,
                                        classifier_mnist.get_config])
def test_image_families_train_with_bfloat16_activations_and_float32_params(get_config):
  config = get_config('tiny')
  config.model.dtype = 'bfloat16'
  family = families.get(config.family)(config)
  # MNIST's shapes and classes without loading it: one step on random binary images.
  family.load_metadata({'image_shape': [28, 28, 1], 'class_names': list('0123456789')})
  builder = loop.StateBuilder(family, config)
  mesh = sharding_lib.make_mesh(config, jax.devices()[:1])
  shardings = sharding_lib.state_shardings(builder.abstract, mesh)
  state = builder.init(shardings)
  rng = np.random.default_rng(0)
  batch = {'image': (rng.random((config.batch_size, 28, 28, 1)) < 0.2).astype(np.uint8) * 255,
           'label': rng.integers(0, 10, config.batch_size).astype(np.int32)}
  step = loop.jit_train_step(builder, config, mesh, shardings)
  state, metrics = step(state, sharding_lib.put_batch(batch, mesh))
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics['loss']) and metrics[loop.STATE_FINITE] == 1.0
  params = jax.tree.leaves(state['params'])
  assert params and all(p.dtype == jnp.float32 for p in params)
  # The activations are bf16: the first layer of each network computes in it.
  models = builder.models(*(jax.device_get(state[k]) for k in ('params', 'rest')))
  x = jnp.zeros((2, 28, 28, 1))
  first = {'vae': lambda m: m['model'].enc_trunk.conv1(x),
           'gan': lambda m: m['discriminator'].conv1(x),
           'classifier': lambda m: m['model'].conv1(x)}[config.family]
  assert first(models).dtype == jnp.bfloat16
