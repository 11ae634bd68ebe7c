"""FID's Inception-v3 in NNX: shapes, the FID pooling patches, bad weight files.

tests/test_inception_torch.py checks it against an independent PyTorch implementation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import inception
from train import evaluate
from train.errors import UserError


def _abstract_model():
  return nnx.eval_shape(lambda: inception.InceptionV3(rngs=nnx.Rngs(0)))


def test_features_are_2048_wide_pool3_of_a_resized_image():
  shape = (2, 28, 28, 1)  # grey MNIST: tiled to RGB, resized to 299 x 299
  graphdef, state = nnx.split(_abstract_model())
  out = jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state,
                       jax.ShapeDtypeStruct(shape, jnp.float32))
  assert out.shape == (shape[0], 2048)


def test_pool_patches_ignore_padding():
  x = jnp.ones((1, 5, 5, 2))
  # TensorFlow's average pool (FID patch) divides by the real neighbours: ones stay ones.
  np.testing.assert_allclose(inception._avg_pool_3x3(x), x)
  # Max pooling pads with -inf, not zeros: an all -1 image stays -1 at the borders.
  np.testing.assert_allclose(inception._max_pool_3x3(-x, stride=1, padding=1), -x)


def test_bad_weight_files_name_the_key(tmp_path):
  # Variables load in sorted order: 'Conv2d_1a_3x3.bn.bias' is the first one looked up.
  np.savez(tmp_path / 'missing.npz', **{'fc.weight': np.zeros((1008, 2048), np.float32)})
  with pytest.raises(ValueError, match="no 'Conv2d_1a_3x3.bn.bias'"):
    inception.load_torch_npz(_abstract_model(), str(tmp_path / 'missing.npz'))
  np.savez(tmp_path / 'bad.npz', **{'Conv2d_1a_3x3.bn.bias': np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match='has shape'):
    inception.load_torch_npz(_abstract_model(), str(tmp_path / 'bad.npz'))


def test_inception_features_need_a_weights_file(tmp_path):
  with pytest.raises(UserError, match='needs --inception_weights'):
    evaluate.InceptionFeatures(None)
  with pytest.raises(UserError, match='no such file'):
    evaluate.InceptionFeatures(str(tmp_path / 'nope.npz'))
