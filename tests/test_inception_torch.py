"""genlab's NNX Inception-v3 against an independent PyTorch one, through the documented weights.

The reference is pytorch-fid's `FIDInceptionV3` (pytorch_fid/inception.py: torchvision's
Inception-v3 blocks with the FID patches), rebuilt here from `torch.nn` layers after the
published architecture (Szegedy et al. 2016; torchvision's `inception.py`), because torchvision
does not import beside the pinned CPU torch. Random weights and random BatchNorm statistics
(so that a swapped mean and variance, or a wrongly transposed kernel, changes the features)
go through the path models/inception.py documents: the state_dict saved with `np.savez`, read
by `load_torch_npz`.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from models import inception

torch = pytest.importorskip('torch', reason='PyTorch is not installed (the `interop` extra: '
                            "pip install -e '.[interop]')")
nn, F = torch.nn, torch.nn.functional


class BasicConv2d(nn.Module):

  def __init__(self, cin, cout, **kwargs):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def avg_pool(x):  # the FID patch: TensorFlow's average pool ignores the padding
  return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):

  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    return torch.cat([
        self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(avg_pool(x))], 1)


class InceptionB(nn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    return torch.cat([
        self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):

  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    dbl = x
    for i in range(1, 6):
      dbl = getattr(self, f'branch7x7dbl_{i}')(dbl)
    return torch.cat([
        self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), dbl,
        self.branch_pool(avg_pool(x))], 1)


class InceptionD(nn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f'branch7x7x3_{i}')(b7)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                      F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
  """pytorch-fid's FIDInceptionE_1 (average pool) and, with `max_pool`, FIDInceptionE_2."""

  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else avg_pool(x)
    return torch.cat([
        self.branch1x1(x),
        torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
        torch.cat([self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl)], 1),
        self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
  """Images in [-1, 1] (NCHW) -> [batch, 2048] pool3 features, as pytorch-fid's InceptionV3
  with resize_input and normalize_input (the [0, 1] -> [-1, 1] map commutes with the resize)."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = FIDInceptionA(192, pool_features=32)
    self.Mixed_5c = FIDInceptionA(256, pool_features=64)
    self.Mixed_5d = FIDInceptionA(288, pool_features=64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = FIDInceptionC(768, c7=128)
    self.Mixed_6c = FIDInceptionC(768, c7=160)
    self.Mixed_6d = FIDInceptionC(768, c7=160)
    self.Mixed_6e = FIDInceptionC(768, c7=192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    self.fc = nn.Linear(2048, 1008)  # in the published state_dict; unused by the features

  def forward(self, x):
    x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    for name in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b', '7c'):
      x = getattr(self, f'Mixed_{name}')(x)
    return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def test_features_match_pytorch_fid_architecture(tmp_path):
  torch.manual_seed(0)
  reference = FIDInceptionV3().eval()
  with torch.no_grad():
    for module in reference.modules():
      if isinstance(module, nn.Conv2d):
        # He initialisation keeps activations alive through the 94 layers, so the features
        # depend on the image (torch's default init lets them fade into the biases).
        nn.init.kaiming_normal_(module.weight, nonlinearity='relu')
      if isinstance(module, nn.BatchNorm2d):
        # Distinct, non-trivial statistics: a swapped mean/variance or scale/bias shows.
        module.running_mean.normal_(0.0, 0.2)
        module.running_var.uniform_(0.5, 2.0)
        module.weight.uniform_(0.7, 1.3)
        module.bias.normal_(0.0, 0.1)
  # The documented weight path: the state_dict as .npz of pytorch-fid's names.
  weights = tmp_path / 'inception_fid.npz'
  np.savez(weights, **{k: v.numpy() for k, v in reference.state_dict().items()})

  images = np.random.default_rng(0).uniform(-1, 1, (2, 37, 29, 3)).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()

  model = inception.load_torch_npz(
      nnx.eval_shape(lambda: inception.InceptionV3(rngs=nnx.Rngs(0))), str(weights))
  graphdef, state = nnx.split(model)
  ours = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, images))

  assert ours.shape == expected.shape == (2, 2048)
  scale = np.abs(expected).max()
  # Features that carry the image: the two images' differ by 100x the tolerance below.
  assert np.abs(expected[0] - expected[1]).max() > 1e-2 * scale
  np.testing.assert_allclose(ours, expected, atol=1e-4 * scale, rtol=0)
