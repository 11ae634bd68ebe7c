"""Int8 quantization of a built model's Linear and Conv layers with qwix (google/qwix).

`quantize` replaces every `nnx.Linear` and `nnx.Conv` of a model, in place, with a copy that
qwix (`qwix.quantize_model`) intercepts: its matmul or convolution then runs on int8 operands.
Each layer is quantized on its own (rather than the whole model at once), so the quantization
applies to whichever model method calls the layer: the full forward pass, and a GPT's KV-cache
`prefill` and `decode` alike. Embeddings, LayerNorms, biases and the attention products of
activations (q k^T, p v) stay in floating point.

Modes:
  'int8_weights'  weight-only int8: kernels are stored as int8 values with one float32 scale
                  per output channel (symmetric absmax: scale = max |w| / 127.5 over the
                  kernel's input axes, q = round(w / scale)), inputs stay float.
  'int8'          weights as above, and each layer's input activations quantized to int8 on the
                  fly (dynamic range: one absmax scale per row, e.g. per token), so the product
                  is int8 x int8.

Post-training quantization (`qat=False`, qwix's `PtqProvider`): the float kernel is replaced by
its quantized form, a `qwix` `WithAux` holding a QArray whose `qvalue` (int8) and `scale`
(float32) are the module's `nnx.Param`s, at '<kernel path>/array/qvalue' and
'<kernel path>/array/scale'. Quantization-aware training (`qat=True`, `QtProvider`): the kernels
stay float32 params at their usual paths and every forward pass fake-quantizes them (and the
activations) as PTQ would, with straight-through gradients, so a QAT model trains and then
converts to the PTQ model of the same mode.

qwix 0.1.8 quantizes a convolution only with its input activations in the same type
(`PtqProvider.conv_general_dilated` requires act_qtype == weight_qtype): a model with
convolutions takes mode 'int8', not 'int8_weights' (ValueError).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import qwix
from flax import nnx

from models import lora

MODES = ('int8_weights', 'int8')


def rule(mode: str, *, qat: bool = False) -> qwix.QuantizationRule:
  """The qwix rule of `mode` for every intercepted op of a quantized layer."""
  if mode not in MODES:
    raise ValueError(f'unknown quantization mode {mode!r}: use one of {", ".join(MODES)}')
  kind = qwix.QtRule if qat else qwix.QuantizationRule
  return kind(module_path='.*', weight_qtype=jnp.int8,
              act_qtype=jnp.int8 if mode == 'int8' else None)


def quantizable_layers(model: nnx.Module) -> list[tuple[tuple[Any, ...], nnx.Module]]:
  """(path, module) of the model's `nnx.Linear` and `nnx.Conv` layers."""
  return [(path, module) for path, module in model.iter_modules()
          if isinstance(module, (nnx.Linear, nnx.Conv)) and path]


def _example_input(layer: nnx.Module):
  """A zero input that calls `layer` once (qwix quantizes a layer's weights on its first call;
  the values do not matter): `[1, in]` for a Linear, `[1, *kernel_size, in]` for a Conv."""
  if isinstance(layer, nnx.Conv):
    return jnp.zeros((1, *layer.kernel_size, layer.in_features), jnp.float32)
  return jnp.zeros((1, layer.in_features), jnp.float32)


def quantize(model: nnx.Module, *, mode: str, qat: bool = False) -> list[str]:
  """Quantizes `model`'s Linear and Conv layers in place (module docstring); returns their
  '/'-joined paths. With qat=False the layers' current weights are quantized now."""
  layers = quantizable_layers(model)
  if mode == 'int8_weights':  # (a QAT model too: it must convert to PTQ afterwards)
    convs = ['/'.join(map(str, p)) for p, m in layers if isinstance(m, nnx.Conv)]
    if convs:
      raise ValueError(f'qwix quantizes convolution weights only together with their input '
                       f'activations (here {convs[0]}, and {len(convs) - 1} more): use mode int8')
  provider = (qwix.QtProvider if qat else qwix.PtqProvider)([rule(mode, qat=qat)])
  for path, layer in layers:
    lora.replace_submodule(model, path, qwix.quantize_model(layer, provider, _example_input(layer)))
  return ['/'.join(map(str, p)) for p, _ in layers]
