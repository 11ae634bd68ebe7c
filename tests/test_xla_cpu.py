"""Entry points keep XLA:CPU's convolutions out of YNNPACK (train.cli.tune_xla_cpu): the flag
reaches XLA through `cli.run`, the convolutions then compile to XLA's own kernels, and their
gradients still equal a float64 numpy reference."""

import json
import os
import re
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest

from train import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_VERSION = tuple(int(x) for x in re.findall(r'\d+', metadata.version('jaxlib'))[:3])
_LOW, _HIGH = cli._XLA_CPU_JAXLIB  # pylint: disable=protected-access
_KNOWN = _LOW <= _VERSION < _HIGH

# An entry point (cli.run) that compiles a 3x3 'SAME' convolution and its two gradients (32
# channels: jaxlib 0.10.2 hands convolutions of so many to YNNPACK, not those of 8) and prints
# XLA_FLAGS, whether a YNNPACK fusion of the compiled HLO holds a convolution, the values and
# the inputs.
_CHILD = """
import json, os, re, sys
import jax, jax.numpy as jnp, numpy as np
from train import cli
def main(argv):
  del argv
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 14, 13, 32)).astype(np.float32)
  w = (rng.normal(size=(3, 3, 32, 32)) / 17).astype(np.float32)
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  loss = lambda x, w: jnp.sum(conv(x, w) ** 2)
  f = jax.jit(lambda x, w: (conv(x, w), *jax.grad(loss, argnums=(0, 1))(x, w)))
  compiled = f.lower(x, w).compile()
  y, dx, dw = compiled(x, w)
  text = compiled.as_text()
  ynn = re.findall(r'calls=(%[^,]+), backend_config=[{]"fusion_config":'
                   r'[{]"kind":"__ynn_fusion', text)
  bodies = {block.strip().split(' ', 1)[0]: block for block in text.split('\\n\\n')}
  print(json.dumps({'xla_flags': os.environ.get('XLA_FLAGS', ''),
                    'ynn_conv': any(' convolution(' in bodies.get(n, '') for n in ynn),
                    'x': x.tolist(), 'w': w.tolist(),
                    'y': np.asarray(y).tolist(), 'dx': np.asarray(dx).tolist(),
                    'dw': np.asarray(dw).tolist()}))
cli.run(main)
"""


def _run(env_updates):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'GENLAB_XLA_TUNING')}
  env.update(env_updates)
  out = subprocess.run([sys.executable, '-c', _CHILD], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=180, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def _reference(x, w):
  """y = conv(x, w) with zero padding 1, and the gradients of sum(y^2), in float64 loops."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  b, h, wd, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = np.zeros((b, h, wd, w.shape[3]))
  for i in range(3):
    for j in range(3):
      y += np.einsum('bhwc,co->bhwo', xp[:, i:i + h, j:j + wd], w[i, j])
  g = 2 * y
  dxp, dw = np.zeros_like(xp), np.zeros_like(w)
  for i in range(3):
    for j in range(3):
      dxp[:, i:i + h, j:j + wd] += np.einsum('bhwo,co->bhwc', g, w[i, j])
      dw[i, j] = np.einsum('bhwc,bhwo->co', xp[:, i:i + h, j:j + wd], g)
  return y, dxp[:, 1:-1, 1:-1], dw


@pytest.mark.skipif(not _KNOWN, reason='the flag is set only for jaxlib versions known to have it')
def test_entry_point_compiles_convolutions_without_ynnpack_and_they_stay_exact():
  tuned = _run({})
  assert cli.XLA_CPU_FLAG in tuned['xla_flags'].split()
  assert not tuned['ynn_conv'], 'a convolution was still handed to YNNPACK'
  y, dx, dw = _reference(tuned['x'], tuned['w'])
  np.testing.assert_allclose(tuned['y'], y, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(tuned['dx'], dx, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(tuned['dw'], dw, rtol=1e-5, atol=1e-3)
  # Without the flag this jaxlib hands the convolutions to YNNPACK: the flag is what changes it.
  untuned = _run({'GENLAB_XLA_TUNING': '0'})
  assert untuned['xla_flags'] == ''
  assert untuned['ynn_conv']
  np.testing.assert_allclose(untuned['dw'], dw, rtol=1e-5, atol=1e-3)


def _tune(env_updates):
  """(tune_xla_cpu's answer, XLA_FLAGS after it) in a fresh process, where JAX has not started."""
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'GENLAB_XLA_TUNING')}
  env.update(env_updates)
  code = 'import os; from train import cli; print(cli.tune_xla_cpu(), os.environ["XLA_FLAGS"])'
  out = subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=60, check=True).stdout.split(maxsplit=1)
  return out[0] == 'True', out[1].strip()


@pytest.mark.skipif(not _KNOWN, reason='the flag is set only for jaxlib versions known to have it')
def test_the_users_choice_wins():
  count = '--xla_force_host_platform_device_count=2'
  assert _tune({'XLA_FLAGS': count}) == (True, f'{count} {cli.XLA_CPU_FLAG}')
  mine = '--xla_cpu_experimental_ynn_fusion_type=individual_convolution'
  assert _tune({'XLA_FLAGS': mine}) == (False, mine)
  assert _tune({'XLA_FLAGS': count, 'GENLAB_XLA_TUNING': '0'}) == (False, count)


@pytest.mark.skipif(not _KNOWN, reason='the flag is set only for jaxlib versions known to have it')
def test_nothing_is_set_once_the_backends_run(monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel
  jax.devices()
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  monkeypatch.delenv('GENLAB_XLA_TUNING', raising=False)
  assert not cli.tune_xla_cpu()
  assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=8'
