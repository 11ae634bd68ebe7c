r"""GPT speed: train-step MFU against a matmul peak, and cached vs full-recompute decoding.

Every figure is a ratio measured in one run, so a noisy shared machine moves numerator and
denominator together:
  * train: ms/step, tokens/s and MFU of the loop's own jitted train step (train.loop's
    `make_train_step`, the default config unless --config says otherwise), with FLOPs from
    nanoGPT's formula 6N + 12*L*T*d per token, against a jitted matmul peak measured by this
    script just before (f32; bf16 when the model computes in bf16);
  * decode: new tokens/s for 500 tokens at batch 1 and 8, for the default model (4 layers,
    width 128) at block 64 and the same model at block 256, KV-cached `generate` against
    `generate_full_recompute` (nanoGPT's generate: the whole window for every token).

  TFDS_DATA_DIR=... python -m experiments.benchmark_gpt            # CPU, default config
  python -m experiments.benchmark_gpt --gpt2 --batch_size=8          # GPT-2 small, bf16 (GPU)

Run it 3 times, one benchmark at a time, and report the median.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from experiments.configs import gpt_shakespeare
from models import gpt as gpt_lib
from train import cli
from train import loop
from train import metrics as metrics_lib
from train import sharding as sharding_lib
from train.families.gpt import GPTFamily

_STEPS = flags.DEFINE_integer('steps', 20, 'Train steps per timed chunk.')
_CHUNKS = flags.DEFINE_integer('chunks', 5, 'Timed chunks (the median is reported).')
_DECODE = flags.DEFINE_bool('decode', True, 'Also benchmark decoding.')
_TRAIN = flags.DEFINE_bool('train', True, 'Benchmark the train step.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 500, 'Tokens generated per decode timing.')
_GPT2 = flags.DEFINE_bool('gpt2', False, 'GPT-2 small (12x768, block 1024, vocab 50304, bf16) '
                          'on synthetic tokens, for accelerators.')
_BATCH = flags.DEFINE_integer('batch_size', None, 'Override the train batch size.')


class SyntheticGPT(GPTFamily):
  """The GPT family on uniformly random tokens of a given vocabulary (speed only)."""

  def __init__(self, config, vocab_size):
    super().__init__(config)
    self.synthetic_vocab = vocab_size

  def setup_data(self, process_index, process_count):
    self.tokenizer = type('Vocab', (), {'vocab_size': self.synthetic_vocab})()

  def train_batch(self, step):
    rng = np.random.default_rng(step)
    shape = (self.config.batch_size, self.config.model.block_size)
    tokens = rng.integers(0, self.synthetic_vocab, shape, dtype=np.int32)
    return {'inputs': tokens, 'targets': tokens}


def bench_train(config, family) -> dict[str, float]:
  mesh = sharding_lib.make_mesh(config)
  family.setup_data(0, 1)
  builder = loop.StateBuilder(family, config)
  shardings = sharding_lib.state_shardings(builder.abstract, mesh)
  state = builder.init(shardings)
  step = jax.jit(loop.make_train_step(builder, config, mesh), donate_argnums=0,
                 in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding_lib.replicated(mesh)))
  batches = [sharding_lib.put_batch(family.train_batch(i), mesh) for i in range(_STEPS.value)]
  t = time.perf_counter()
  state, m = step(state, batches[0])
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t
  dtype = jnp.bfloat16 if config.model.dtype == 'bfloat16' else jnp.float32
  peak = metrics_lib.matmul_peak_flops(list(mesh.devices.flat), dtype=dtype,
                                       size=4096 if jax.default_backend() != 'cpu' else 1024)
  times = []
  for _ in range(_CHUNKS.value):
    t = time.perf_counter()
    for b in batches:
      state, m = step(state, b)
    jax.block_until_ready(m)
    times.append((time.perf_counter() - t) / len(batches))
  dt = statistics.median(times)
  flops = family.flops_per_step(builder.abstract['params'])
  return {'compile_s': compile_s, 'ms_per_step': 1e3 * dt,
          'tokens_per_s': family.items_per_step() / dt, 'gflops_per_step': flops / 1e9,
          'peak_gflops': peak / 1e9, 'mfu': flops / dt / peak, 'loss': float(m['loss'])}


def bench_decode(model_cfg, batch: int, new_tokens: int) -> dict[str, float]:
  model = gpt_lib.GPT(vocab_size=65, rngs=nnx.Rngs(0), **model_cfg)
  prompt = jnp.zeros((batch, 1), jnp.int32)
  out = {}
  for name, fn in (('cached', gpt_lib.generate), ('full', gpt_lib.generate_full_recompute)):
    run = lambda: jax.block_until_ready(fn(model, prompt, jax.random.key(0),
                                           max_new_tokens=new_tokens, temperature=1.0))
    run()  # compile
    best = min(_timed(run) for _ in range(3))
    out[f'{name}_tokens_per_s'] = batch * new_tokens / best
  out['speedup'] = out['cached_tokens_per_s'] / out['full_tokens_per_s']
  return out


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def main(argv):
  del argv
  print(f'devices: {jax.devices()}')
  if _TRAIN.value:
    if _GPT2.value:
      config = gpt_shakespeare.get_config('gpu')
      config.model.update(block_size=1024, num_layers=12, num_heads=12, embed_dim=768,
                          dropout=0.0, dtype='bfloat16')
      config.batch_size = _BATCH.value or 8
      family = SyntheticGPT(config, vocab_size=50304)
    else:
      config = gpt_shakespeare.get_config()
      if _BATCH.value:
        config.batch_size = _BATCH.value
      family = GPTFamily(config)
    r = bench_train(config, family)
    print(f'train {config.model.to_dict()} batch {config.batch_size}: '
          f'{r["ms_per_step"]:.2f} ms/step | {r["tokens_per_s"]:,.0f} tokens/s | '
          f'{r["gflops_per_step"]:.3f} GFLOP/step (6N+12LTd) | matmul peak '
          f'{r["peak_gflops"]:.1f} GFLOP/s | MFU {100 * r["mfu"]:.1f}% | '
          f'compile {r["compile_s"]:.1f}s')
  if _DECODE.value and not _GPT2.value:
    base = {k: v for k, v in gpt_shakespeare.get_config().model.to_dict().items()
            if k not in ('dtype', 'dropout', 'init_std', 'attention')}
    for model_cfg in (base, {**base, 'block_size': 256}):
      for batch in (1, 8):
        r = bench_decode(model_cfg, batch, _NEW_TOKENS.value)
        print(f'decode block {model_cfg["block_size"]} ({model_cfg["num_layers"]}x'
              f'{model_cfg["embed_dim"]}) batch {batch}, {_NEW_TOKENS.value} new tokens: cached '
              f'{r["cached_tokens_per_s"]:,.0f} tokens/s | full recompute '
              f'{r["full_tokens_per_s"]:,.0f} tokens/s | speedup {r["speedup"]:.1f}x')


if __name__ == '__main__':
  cli.tune_host()  # as the train/sample/evaluate commands do
  app.run(main)
