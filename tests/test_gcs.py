"""A gs:// run directory end to end, against a local GCS emulator (loopback only, no network).

The emulator (`gcp-storage-emulator`, the `test` extra) runs in its own process; every client
is pointed at it through environment variables: gcsfs (etils.epath's gs:// backend, used for
config.json, metrics, TensorBoard, samples, reports and Orbax's metadata) through
STORAGE_EMULATOR_HOST, tensorstore (Orbax's array backend) through TENSORSTORE_GCS_HTTP_URL
with a fixed test token.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from experiments.configs import classifier_mnist, vae_mnist
from train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = 'genlab-test'

pytest.importorskip('gcp_storage_emulator', reason='gcp-storage-emulator (the test extra) is '
                    'not installed')


def emulator_env(url: str) -> dict[str, str]:
  return {
      'STORAGE_EMULATOR_HOST': url,              # gcsfs
      'FSSPEC_GS_TOKEN': 'anon',                 # gcsfs: no credentials to look for
      'NO_GCE_CHECK': 'true',                    # gcsfs: no metadata-server probe
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',  # gcsfs: no gRPC bucket-type probe
      'TENSORSTORE_GCS_HTTP_URL': url,           # tensorstore
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',  # tensorstore: skip Google auth
      # The emulator answers one request at a time (a plain http.server with a 5-connection
      # backlog): tensorstore's 32 parallel requests then fail now and then.
      'TENSORSTORE_GCS_REQUEST_CONCURRENCY': '1',
  }


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """Starts the emulator; yields the environment every process needs to reach it."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  log = open(tmp_path_factory.mktemp('gcs') / 'emulator.log', 'w')
  server = subprocess.Popen([sys.executable, '-m', 'tests.gcs_emulator', str(port), BUCKET],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 60
  while True:
    try:
      socket.create_connection(('127.0.0.1', port), timeout=1).close()
      break
    except OSError:
      if time.time() > deadline or server.poll() is not None:
        server.kill()
        pytest.fail(f'the GCS emulator did not start (log: {log.name})')
      time.sleep(0.2)
  env = {**os.environ, **emulator_env(f'http://127.0.0.1:{port}'),
         'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  yield env
  server.terminate()
  server.wait(timeout=30)
  log.close()


def python(env, *args, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def read(env, path) -> str:
  """The text of a gs:// object, read by another process (as a user would)."""
  proc = python(env, '-c', 'import sys; from etils import epath; '
                f'sys.stdout.write(epath.Path({path!r}).read_text())')
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout


def listing(env, path) -> list[str]:
  proc = python(env, '-c', 'from etils import epath; '
                f'p = epath.Path({path!r}); print(*sorted(x.name for x in p.iterdir()) '
                'if p.exists() else [])')
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout.split()


def test_emulator_media_reads_carry_the_generation(gcs):
  """tensorstore's conditional writes need `x-goog-generation` on its JSON-API media reads (GCS
  sends it; the emulator is patched to, see tests/gcs_emulator.py)."""
  import requests  # pylint: disable=import-outside-toplevel
  url = gcs['STORAGE_EMULATOR_HOST']
  upload = requests.post(f'{url}/upload/storage/v1/b/{BUCKET}/o',
                         params={'uploadType': 'media', 'name': 'probe/x'}, data=b'abc',
                         timeout=30)
  upload.raise_for_status()
  generation = upload.json()['generation']
  for path in (f'/storage/v1/b/{BUCKET}/o/probe%2Fx', f'/download/storage/v1/b/{BUCKET}/o/probe%2Fx'):
    read = requests.get(url + path, params={'alt': 'media'}, timeout=30)
    assert read.status_code == 200 and read.content == b'abc', (path, read.status_code)
    assert read.headers.get('x-goog-generation') == generation, (path, dict(read.headers))


def test_toy_run_on_gcs_is_killed_and_resumes(gcs):
  workdir = f'gs://{BUCKET}/toy'
  args = ['-m', 'train', '--config=tests/toy_config.py', f'--workdir={workdir}',
          '--config.log_every=1']
  first = python(gcs, *args, '--config.total_steps=4')
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert re.search(r'checkpoint 4: [1-9][\d,]* bytes on disk', first.stdout), first.stdout
  # Relaunched for longer, then killed (-9) between checkpoints. (A kill in the middle of a
  # checkpoint write is tested on a local disk in test_nothing_lost.py: on this emulator,
  # re-saving the step whose write was cut off fails in tensorstore with "Malformed
  # StorageGeneration".)
  proc = subprocess.Popen([sys.executable, *args, '--config.total_steps=100000',
                           '--config.checkpoint_every=100000'], cwd=ROOT, env=gcs,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  seen = []
  try:
    for line in proc.stdout:
      seen.append(line)
      if line.startswith('step 8/'):
        break
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
  assert any(l.startswith('step 8/') for l in seen), ''.join(seen)[-3000:]

  resumed = python(gcs, *args, '--config.total_steps=8')
  assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
  assert f'Resumed from {workdir}/checkpoints/4' in resumed.stdout, resumed.stdout
  assert 'steps 4->8' in resumed.stdout

  assert {'config.json', 'family.json', 'metrics.jsonl', 'checkpoints', 'tensorboard'} <= set(
      listing(gcs, workdir))
  assert json.loads(read(gcs, f'{workdir}/config.json'))['total_steps'] == 8
  rows = [json.loads(l) for l in read(gcs, f'{workdir}/metrics.jsonl').splitlines()]
  logged = [r['step'] for r in rows if 'loss' in r]
  assert logged[:5] == [1, 2, 3, 4, 5] and logged[-1] == 8   # both runs' rows, in one file
  assert '8' in listing(gcs, f'{workdir}/checkpoints')
  assert any(n.startswith('events') for n in listing(gcs, f'{workdir}/tensorboard'))


def test_two_processes_write_one_gcs_run(gcs):
  workdir = f'gs://{BUCKET}/two_processes'
  proc = python(gcs, 'launch/local.py', '--num_processes=2', '--devices_per_process=2',
                '--timeout=280', '--', sys.executable, '-m', 'train',
                '--config=tests/toy_config.py', f'--workdir={workdir}',
                '--config.total_steps=4', '--config.checkpoint_every=2', timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert '[p0] ' in proc.stdout and '[p1] ' in proc.stdout
  assert listing(gcs, f'{workdir}/checkpoints')[:2] == ['2', '4']
  # One process's rows only (process 0 writes), and a single process resumes the run.
  rows = [json.loads(l) for l in read(gcs, f'{workdir}/metrics.jsonl').splitlines()]
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 3, 4]
  resumed = python(gcs, '-m', 'train', '--config=tests/toy_config.py', f'--workdir={workdir}',
                   '--config.total_steps=5')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resumed from {workdir}/checkpoints/4' in resumed.stdout


@pytest.fixture
def gcs_here(gcs, monkeypatch):
  """This process reaches the emulator too (fsspec read its environment at import)."""
  import fsspec  # pylint: disable=import-outside-toplevel
  for key, value in gcs.items():
    if key != 'XLA_FLAGS':
      monkeypatch.setenv(key, value)
  monkeypatch.setitem(fsspec.config.conf, 'gs', {'token': 'anon'})
  fsspec.filesystem('gs').clear_instance_cache()
  return gcs


@pytest.mark.skipif(not os.environ.get('TFDS_DATA_DIR'), reason='TFDS_DATA_DIR is not set')
def test_image_run_on_gcs_samples_and_evaluates(gcs_here):
  gcs = gcs_here
  generator, classifier = f'gs://{BUCKET}/vae', f'gs://{BUCKET}/classifier'
  # Trained in this process: MNIST is loaded once per test process.
  for get_config, workdir in ((vae_mnist.get_config, generator),
                              (classifier_mnist.get_config, classifier)):
    config = get_config('tiny')
    config.update_from_flattened_dict({'total_steps': 2, 'eval_batches': 1, 'log_every': 1})
    loop.train(config, workdir, devices=jax.devices()[:1])
  sample = python(gcs, '-m', 'train.sample', f'--workdir={generator}', '--num_samples=4')
  assert sample.returncode == 0, sample.stderr[-3000:]
  assert f'wrote 4 samples to {generator}/samples/sample.png' in sample.stdout
  assert 'sample.png' in listing(gcs, f'{generator}/samples')
  report = python(gcs, '-m', 'train.evaluate', f'--workdir={generator}',
                  f'--classifier={classifier}', '--num_samples=8', '--pr_k=3', '--batch=8',
                  '--likelihood_examples=0')
  assert report.returncode == 0, report.stderr[-3000:]
  names = listing(gcs, f'{generator}/eval')
  assert len([n for n in names if n.endswith('.json')]) == 1, names
  assert len([n for n in names if n.endswith('.png')]) == 1, names
  saved = json.loads(read(gcs, f'{generator}/eval/{[n for n in names if n.endswith(".json")][0]}'))
  assert saved['workdir'] == generator and saved['num_samples'] == 8
