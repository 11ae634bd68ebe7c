"""The benchmark scripts run (they have no other test, and a family change once broke their
synthetic-token GPT unnoticed). In subprocesses: their absl flags would clash with the train
commands' in this process."""

import json
import os
import subprocess
import sys

from tests.conftest import needs_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device, as run

SYNTHETIC = '''
import json
import jax, numpy as np
from experiments.benchmark_gpt import SyntheticGPT
from experiments.configs import gpt_shakespeare
from models import rngs
config = gpt_shakespeare.get_config('tiny')
config.batch_size = 4
family = SyntheticGPT(config, vocab_size=37)
family.setup_data(0, 1)
batch = family.train_batch(0)
model = family.make_models(rngs.rngs(jax.random.key(0)))['model']
logits = np.asarray(model(batch['inputs']))
print(json.dumps({'shape': batch['inputs'].shape, 'low': int(batch['inputs'].min()),
                  'high': int(batch['inputs'].max()), 'distinct': len(np.unique(batch['inputs'])),
                  'table': model.wte.embedding.shape, 'logits': logits.shape,
                  'finite': bool(np.isfinite(logits).all())}))
'''


def run(args):
  out = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout


def test_synthetic_gpt_builds_at_its_vocabulary():
  # The family benchmark_gpt --gpt2 and benchmark_peers train on: uniform random ids of its own
  # vocabulary (37 here), which sizes the model's table and logits.
  got = json.loads(run(['-c', SYNTHETIC]).strip().splitlines()[-1])
  assert got['shape'] == [4, 32] and got['low'] >= 0 and got['high'] < 37 and got['distinct'] > 30
  assert got['table'][0] == 37 and got['logits'] == [4, 32, 37] and got['finite']


@needs_data  # the default config's vocabulary comes from Tiny Shakespeare
def test_benchmark_gpt_times_a_train_step():
  line = [l for l in run(['-m', 'experiments.benchmark_gpt', '--steps=2', '--chunks=1',
                          '--nodecode']).splitlines() if l.startswith('train ')]
  # The default config's 6N + 12LTd per token, x 12 x 64 tokens: N = 801,664 (the params but
  # the 64 x 128 position table), L = 4, T = 64, d = 128 -> 3.996e9.
  assert len(line) == 1 and '3.996 GFLOP/step (6N+12LTd)' in line[0] and 'ms/step' in line[0]
