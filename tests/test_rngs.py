"""models/rngs.py: the same params as `nnx.Rngs`, without JAX's traced-error path per param.

The reference is Flax's own `nnx.Rngs`: every param (and the final counts) of a GPT built from
`rngs.rngs(seed)` equals the one built from `nnx.Rngs(seed)`, eagerly and traced. (A GPT: its
init is the cheapest to compile; the UNet's takes ~15 s and draws from the stream the same way.)
"""

import jax
import numpy as np
import pytest
from flax import nnx
from jax._src.interpreters import partial_eval as pe

from models import gpt
from models import rngs as rngs_lib

def _gpt(rngs):
  return gpt.GPT(vocab_size=20, block_size=8, num_layers=2, num_heads=2, embed_dim=16, rngs=rngs)


def _leaves(state):
  return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                     else x) for x in jax.tree.leaves(state)]


def _built(make_rngs, build, traced):
  def init(key):
    return nnx.state(build(make_rngs(key)))
  key = jax.random.key(3)
  return _leaves(jax.jit(init)(key) if traced else init(key))


@pytest.mark.parametrize('traced', [False, True], ids=['eager', 'jit'])
def test_same_params_and_counts_as_nnx_rngs(traced):
  ours = _built(rngs_lib.rngs, _gpt, traced)
  theirs = _built(nnx.Rngs, _gpt, traced)
  assert len(ours) == len(theirs) > 10
  for a, b in zip(ours, theirs):
    np.testing.assert_array_equal(a, b)


def test_forked_streams_draw_the_same_keys():
  ours, theirs = rngs_lib.rngs(5), nnx.Rngs(5)
  for _ in range(2):
    a, b = ours.default.fork(), theirs.default.fork()
    assert isinstance(a, rngs_lib.CountingStream)
    for _ in range(3):
      np.testing.assert_array_equal(jax.random.key_data(a()), jax.random.key_data(b()))


def test_tracing_an_init_builds_no_tracer_error_messages(monkeypatch):
  calls = []
  original = pe.DynamicJaxprTracer._origin_msg
  monkeypatch.setattr(pe.DynamicJaxprTracer, '_origin_msg',
                      lambda self: calls.append(1) or original(self))
  jax.eval_shape(lambda key: nnx.state(_gpt(nnx.Rngs(key))), jax.random.key(0))
  # Flax's stream: one message per param drawn (what rngs.rngs avoids); none with ours.
  assert len(calls) > 10
  calls.clear()
  jax.eval_shape(lambda key: nnx.state(_gpt(rngs_lib.rngs(key))), jax.random.key(0))
  assert not calls
