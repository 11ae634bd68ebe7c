"""`python -m train.quantize --workdir=RUN --out=DIR --mode=int8_weights|int8`: int8 with qwix.

Post-training quantization of RUN's latest checkpoint (EMA params where the run kept them; a
quantization-aware run, `config.quantize.qat`, converts the same way): every Linear and Conv
layer of its networks becomes int8 (`models.quantize`; 'int8_weights': int8 kernels with one
float32 scale per output channel; 'int8': the layers' input activations quantized on the fly
too). DIR is written as a run directory: config.json (RUN's config with `quantize.mode` set,
`quantize.qat` False, `quantize.source` 'RUN:STEP', no EMA), family.json and the family's run
files, and a checkpoint at RUN's step holding the quantized params (int8 values and their
scales; no optimizer state: an int8 run does not train). `train.sample` and `train.evaluate`
read DIR like any run: the family builds the quantized model from its config.

It reports, on stdout and in DIR/quantize.json: the param bytes of RUN's and DIR's networks
(what the arrays hold) and both checkpoints' bytes on disk; the eval loss of both models on the
family's eval batches (the validation windows training evaluates on; the same batches for
both); and for a GPT, decode tokens/s of the KV-cache `generate` of both models in this
process (--decode_batch rows, --decode_tokens new tokens, median of 3 timed calls after one
compiling call, the two models alternating). DIR must not exist (or be empty): no run's files
are overwritten.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from etils import epath
from flax import nnx

from models import gpt as gpt_lib
from models import quantize as quantize_lib
from train import checkpoint as ckpt_lib
from train import cli
from train import config as config_lib
from train import loop
from train import run_loader
from train import sample
from train import sharding as sharding_lib
from train import storage
from train import tune
from train.errors import UserError

# --workdir (the run to quantize) and --out (the run directory to write) are train.sample's
# flags, which this command shares.
_MODE = flags.DEFINE_string('mode', None, f'Quantization: {" | ".join(quantize_lib.MODES)}.')
_DECODE_BATCH = flags.DEFINE_integer('decode_batch', 8, 'GPT: rows of the decode timing.')
_DECODE_TOKENS = flags.DEFINE_integer('decode_tokens', 256, 'GPT: new tokens per call of the '
                                      'decode timing (0: no timing).')
_REPEATS = 3


def check_mode(mode: str | None) -> str:
  if mode not in quantize_lib.MODES:
    raise UserError(f'--mode={mode}: unknown quantization mode; use one of '
                    f'{", ".join(quantize_lib.MODES)}')
  return mode


def check_out(out: str) -> None:
  """UserError unless `out` is new (or an empty directory): nothing of a run is overwritten."""
  if storage.exists(out) and (not storage.isdir(out) or any(epath.Path(out).iterdir())):
    raise UserError(f'--out={out}: already exists and is not empty; give a new directory '
                    '(nothing is overwritten)')


def quantized_config(config: ml_collections.ConfigDict, mode: str, source: str
                     ) -> ml_collections.ConfigDict:
  """RUN's config for the int8 run: quantize.mode set (qat off, the source run recorded), no
  EMA (its params are the ones quantized)."""
  out = config_lib.from_json(config_lib.to_json(config))
  out.quantize = ml_collections.ConfigDict(dict(mode=mode, qat=False, source=source))
  out.ema_decay = 0.0
  return out


def _shapes(tree) -> list[tuple[str, tuple[int, ...], str]]:
  return [(sharding_lib.leaf_path(p), tuple(x.shape), str(x.dtype))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def param_bytes(models: dict[str, nnx.Module]) -> int:
  return sum(ckpt_lib.array_bytes(nnx.state(m, nnx.Param)) for m in models.values())


def eval_loss(family, models: dict[str, nnx.Module], batches: list[Any]) -> float:
  """Mean of `family.eval_step`'s loss over `batches` (jitted, one compilation)."""
  graphdefs, states = {}, {}
  for name, model in models.items():
    graphdefs[name], states[name] = nnx.split(model)
  step = jax.jit(lambda states, batch: family.eval_step(
      {n: nnx.merge(graphdefs[n], states[n]) for n in graphdefs}, batch)['loss'])
  return float(np.mean([float(step(states, batch)) for batch in batches]))


def decode_tokens_per_s(models: dict[str, gpt_lib.GPT], *, batch: int, new_tokens: int
                        ) -> dict[str, float]:
  """New tokens/s of KV-cache `generate` per model: median of `_REPEATS` timed calls after a
  compiling one; the models take turns, so a change of host load hits them alike."""
  prompt = jnp.zeros((batch, 1), jnp.int32)
  calls = {name: (lambda m=model: jax.block_until_ready(gpt_lib.generate(
      m, prompt, jax.random.key(0), max_new_tokens=new_tokens, temperature=1.0)))
           for name, model in models.items()}
  for call in calls.values():
    call()  # compiles
  times: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(_REPEATS):
    for name, call in calls.items():
      start = time.perf_counter()
      call()
      times[name].append(time.perf_counter() - start)
  return {name: batch * new_tokens / statistics.median(t) for name, t in times.items()}


def quantize_run(workdir: str, out: str, mode: str, *, decode_batch: int = 8,
                 decode_tokens: int = 256) -> dict[str, Any]:
  """Writes the quantized run to `out` (module docstring); returns the report."""
  mode = check_mode(mode)
  check_out(out)
  config_path = storage.join(workdir, 'config.json')
  if storage.isfile(config_path):  # (load_models names what else is wrong with `workdir`)
    config = config_lib.from_json(json.dumps(storage.read_json(config_path,
                                                               f'--workdir={workdir}')))
    if tune.post_training_quantized(config):
      raise UserError(f'--workdir={workdir}: already quantized (config.quantize.mode='
                      f'{tune.quantize_mode(config)!r}); quantize its source run instead')
  family, models, step = run_loader.load_models(workdir)
  config = family.config
  if tune.lora_rank(config):
    raise UserError(f'--workdir={workdir}: a LoRA run; merge its adapters first '
                    '(python -m train.export --merge_lora)')
  source = f'{storage.absolute(workdir)}:{step}'
  config8 = quantized_config(config, mode, source)
  # The float models of RUN: a QAT run's layers fake-quantize, and its float kernels convert.
  reference = {n: nnx.clone(m) for n, m in models.items()}
  quantized = tune.apply_quantization({n: nnx.clone(m) for n, m in models.items()}, config8)
  builder = loop.StateBuilder(family, config8)
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = builder.init(jax.tree.map(lambda _: one_device, builder.abstract))
  params, rest = {}, {}
  for name, model in quantized.items():
    _, params[name], rest[name] = nnx.split(model, nnx.Param, ...)
    for group, tree in (('params', params[name]), ('rest', rest[name])):
      if _shapes(tree) != _shapes(state[group][name]):
        raise UserError(f'--workdir={workdir}: network {name!r} does not quantize into the '
                        f'model its config builds ({group} differ); is the run damaged?')
  state = dict(state, params=params, rest=rest, step=jnp.asarray(step, jnp.int32))

  # Measured before anything is written: a failure (e.g. missing data) leaves no DIR behind.
  report: dict[str, Any] = {
      'workdir': storage.absolute(workdir), 'out': storage.absolute(out), 'step': step,
      'family': family.name, 'mode': mode,
      # What the int8 model is compared with: the float model, or a QAT run's fake-quantized one.
      'source_model': 'qat' if tune.quantize_mode(config) else 'float',
      'quantized_layers': {n: len(quantize_lib.quantizable_layers(m)) for n, m in models.items()},
      'param_bytes': param_bytes(reference), 'quantized_param_bytes': param_bytes(quantized)}
  report['param_bytes_ratio'] = report['quantized_param_bytes'] / report['param_bytes']
  family.setup_data(0, 1)
  batches = list(family.eval_batches())
  report['eval_batches'] = len(batches)
  report['eval_loss'] = eval_loss(family, reference, batches)
  report['quantized_eval_loss'] = eval_loss(family, quantized, batches)
  report['eval_loss_change'] = report['quantized_eval_loss'] - report['eval_loss']
  if isinstance(models.get('model'), gpt_lib.GPT) and decode_tokens > 0:
    speed = decode_tokens_per_s({'f32': reference['model'], 'int8': quantized['model']},
                                batch=decode_batch, new_tokens=decode_tokens)
    report.update(decode_batch=decode_batch, decode_tokens=decode_tokens, decode_repeats=_REPEATS,
                  decode_tokens_per_s=speed['f32'], quantized_decode_tokens_per_s=speed['int8'],
                  decode_speed_ratio=speed['int8'] / speed['f32'])

  sample.write_run(out, config8, family, state, step,
                   {'quantized_from': source, 'quantize_mode': mode})

  report['checkpoint_bytes'] = ckpt_lib.step_bytes(storage.join(workdir, 'checkpoints'), step)
  report['quantized_checkpoint_bytes'] = ckpt_lib.step_bytes(storage.join(out, 'checkpoints'),
                                                             step)
  storage.write_text(storage.join(out, 'quantize.json'), json.dumps(report, indent=1))
  return report


def summary(report: dict[str, Any]) -> str:
  r = report
  lines = [
      f'quantized {r["workdir"]} (step {r["step"]}) to {r["mode"]} in {r["out"]}',
      f'param bytes: {r["param_bytes"]:,} -> {r["quantized_param_bytes"]:,} '
      f'({r["param_bytes_ratio"]:.1%}) | checkpoint on disk: {r["checkpoint_bytes"]:,} -> '
      f'{r["quantized_checkpoint_bytes"]:,}',
      f'eval loss ({r["eval_batches"]} batches): {r["eval_loss"]:.4f} -> '
      f'{r["quantized_eval_loss"]:.4f} ({r["eval_loss_change"]:+.4f})']
  if 'decode_tokens_per_s' in r:
    lines.append(f'decode tokens/s (batch {r["decode_batch"]}, {r["decode_tokens"]} tokens, '
                 f'median of {r["decode_repeats"]}): {r["source_model"]} '
                 f'{r["decode_tokens_per_s"]:,.0f} | '
                 f'{r["mode"]} {r["quantized_decode_tokens_per_s"]:,.0f} '
                 f'(x{r["decode_speed_ratio"]:.2f})')
  return '\n'.join(lines + [f'wrote {storage.join(r["out"], "quantize.json")}'])


def main(argv):
  workdir, out = sample.workdir_and_out(argv)
  if not _MODE.value:
    raise UserError(f'--mode is required: one of {", ".join(quantize_lib.MODES)}')
  if _DECODE_BATCH.value < 1:
    raise UserError(f'--decode_batch={_DECODE_BATCH.value}: must be >= 1')
  if _DECODE_TOKENS.value < 0:
    raise UserError(f'--decode_tokens={_DECODE_TOKENS.value}: must be >= 0 (0: no timing)')
  report = quantize_run(workdir, out, _MODE.value, decode_batch=_DECODE_BATCH.value,
                        decode_tokens=_DECODE_TOKENS.value)
  print(summary(report), flush=True)


if __name__ == '__main__':
  cli.run(main)
