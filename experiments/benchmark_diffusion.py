r"""Diffusion speed: training and sampling images/s of the MNIST UNet, as ratios measured in one run.

For 64 MNIST images at 28x28 (the class-conditional `ddpm_mnist.py:cond` model):
  * train: images/s of the loop's own jitted train step (train.loop's `make_train_step`), and its
    MFU: FLOPs from XLA's cost analysis of the compiled step against a jitted f32 matmul peak
    measured by this script;
  * sample: images/s of DDIM-50 and of DDPM-1000 (each one jitted lax.scan over the steps),
    with the MFU of their network calls (steps x the cost analysis of one UNet forward);
  * ratios: train and DDIM-50 images/s over DDPM-1000 images/s.
--guidance=1 (default) samples the plain conditional model, one network call per step; any
other scale runs a doubled batch (conditional + null labels), about half the images/s.
Sampling speed does not depend on the weights: freshly initialised params are used.

  TFDS_DATA_DIR=... python -m experiments.benchmark_diffusion [--nosample] [--chunks=3]

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

from experiments.configs import ddpm_mnist
from train import cli
from train import loop
from train import metrics as metrics_lib
from train import sharding as sharding_lib
from train.families.diffusion import DiffusionFamily

_BATCH = flags.DEFINE_integer('batch', 64, 'Images per train step and per sampler call.')
_STEPS = flags.DEFINE_integer('train_steps', 5, 'Train steps per timed chunk.')
_CHUNKS = flags.DEFINE_integer('chunks', 3, 'Timed train chunks (the median is reported).')
_GUIDANCE = flags.DEFINE_float('guidance', 1.0, 'Classifier-free guidance scale of sampling.')
_SAMPLE = flags.DEFINE_bool('sample', True, 'Also time DDIM-50 and DDPM-1000 sampling '
                            '(--nosample: the train step alone).')


def cost_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def bench_train(config, family, peak: float) -> tuple[dict[str, float], dict]:
  mesh = sharding_lib.make_mesh(config, jax.devices()[:1])
  builder = loop.StateBuilder(family, config)
  shardings = sharding_lib.state_shardings(builder.abstract, mesh)
  state = builder.init(shardings)
  step = loop.TrainStep(builder, config, mesh, shardings)
  batches = [sharding_lib.put_batch(family.train_batch(i), mesh) for i in range(_STEPS.value)]
  t = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t
  flops = cost_flops(compiled)
  state, m = compiled(step.flatten(state), batches[0])   # the state's leaves from here
  jax.block_until_ready(m)
  times = []
  for _ in range(_CHUNKS.value):
    t = time.perf_counter()
    for b in batches:
      state, m = compiled(state, b)
    jax.block_until_ready(m)
    times.append((time.perf_counter() - t) / len(batches))
  dt = statistics.median(times)
  state = step.unflatten(state)
  models = builder.models(builder.sampling_params(state), state['rest'])
  return {'compile_s': compile_s, 'ms_per_step': 1e3 * dt,
          'images_per_s': config.batch_size / dt, 'gflops_per_step': flops / 1e9,
          'mfu': flops / dt / peak}, models


def bench_sample(family, models, sampler: str, steps: int, peak: float) -> dict[str, float]:
  n = _BATCH.value
  graphdef, state = nnx.split(models['model'])
  x_T = jax.random.normal(jax.random.key(0), (n, *family.image_shape))
  labels = jnp.asarray(np.arange(n) % family.num_classes, jnp.int32)
  run = family.sampler_fn(sampler, steps, 0.0 if sampler == 'ddim' else 1.0, _GUIDANCE.value)
  t = time.perf_counter()
  compiled = run.lower(graphdef, state, x_T, labels, jax.random.key(1)).compile()
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  jax.block_until_ready(compiled(state, x_T, labels, jax.random.key(1)))
  dt = time.perf_counter() - t
  # XLA counts a scan's body once: the chain's FLOPs are steps x one forward of the batch.
  calls = 1 if _GUIDANCE.value == 1.0 else 2
  forward = jax.jit(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y)).lower(
      state, x_T, jnp.zeros((n,), jnp.int32), labels).compile()
  flops = steps * calls * cost_flops(forward)
  return {'compile_s': compile_s, 'seconds': dt, 'images_per_s': n / dt, 'mfu': flops / dt / peak}


def main(argv):
  del argv
  print(f'devices: {jax.devices()[:1]}')
  config = ddpm_mnist.get_config('cond')
  config.batch_size = _BATCH.value
  family = DiffusionFamily(config)
  family.setup_data(0, 1)
  peak = metrics_lib.matmul_peak_flops(jax.devices()[:1])
  train, models = bench_train(config, family, peak)
  print(f'matmul peak (f32, 1 device) {peak / 1e9:.1f} GFLOP/s')
  print(f'train: batch {config.batch_size}, {train["ms_per_step"]:.0f} ms/step | '
        f'{train["images_per_s"]:.1f} images/s | {train["gflops_per_step"]:.2f} GFLOP/step '
        f'(XLA) | MFU {100 * train["mfu"]:.1f}% | compile {train["compile_s"]:.0f}s')
  if not _SAMPLE.value:
    return
  ddim = bench_sample(family, models, 'ddim', 50, peak)
  ddpm = bench_sample(family, models, 'ddpm', config.diffusion.num_steps, peak)
  for name, r in (('DDIM-50', ddim), ('DDPM-1000', ddpm)):
    print(f'{name}: {_BATCH.value} images in {r["seconds"]:.2f}s | {r["images_per_s"]:.2f} '
          f'images/s | MFU {100 * r["mfu"]:.1f}% | compile {r["compile_s"]:.0f}s')
  base = ddpm['images_per_s']
  print(f'ratios to DDPM-1000 sampling: train {train["images_per_s"] / base:.1f}x | '
        f'DDIM-50 {ddim["images_per_s"] / base:.1f}x  (guidance {_GUIDANCE.value})')


if __name__ == '__main__':
  cli.tune_host()  # as the train/sample/evaluate commands do
  app.run(main)
