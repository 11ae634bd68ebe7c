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


GROUP_NORM = '''
import json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from experiments.benchmark_ops import group_norm_dots
out = {}
for shape, groups in (((3, 5, 4, 12), 4), ((2, 3, 3, 8), 8)):
  keys = jax.random.split(jax.random.key(sum(shape)), 4)
  x = 3.0 * jax.random.normal(keys[0], shape) + 1.5
  dy = jax.random.normal(keys[1], shape)
  norm = nnx.GroupNorm(shape[-1], num_groups=groups, rngs=nnx.Rngs(0))
  norm.scale[...] = jax.random.normal(keys[2], norm.scale.shape)
  norm.bias[...] = jax.random.normal(keys[3], norm.bias.shape)
  graphdef, state = nnx.split(norm)
  want, vjp = jax.vjp(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
  d_state, want_dx = vjp(dy)
  params = (norm.scale[...], norm.bias[...])
  got, vjp = jax.vjp(lambda p, x: group_norm_dots(x, *p, groups, norm.epsilon), params, x)
  (d_scale, d_bias), dx = vjp(dy)
  err = lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max())
  out[str(shape)] = [err(got, want), err(dx, want_dx), err(d_scale, d_state['scale'][...]),
                     err(d_bias, d_state['bias'][...])]
print(json.dumps(out))
'''


def test_benchmark_ops_group_norm_candidate_equals_flax_and_its_autodiff():
  # benchmark_ops' GroupNorm with batched-dot sums and a hand-written backward against flax's
  # nnx.GroupNorm and JAX's autodiff of it: output, dx, d scale and d bias.
  got = json.loads(run(['-c', GROUP_NORM]).strip().splitlines()[-1])
  assert len(got) == 2
  for shape, errors in got.items():
    assert max(errors) < 1e-5, (shape, errors)
