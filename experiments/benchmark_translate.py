r"""Translation speed: the train step's MFU and beam-search / greedy sentences per second.

  * train: ms/step, real (non-padding) tokens/s and MFU of the loop's jitted train step
    (`train.loop.make_train_step`) for experiments/configs/translate_multi30k.py on real packed
    Multi30k batches, with FLOPs from XLA's cost analysis of that compiled step (padding slots
    included, so MFU counts them as work) against a jitted f32 matmul peak measured by this
    script just before (the best of 3: `experiments/train_speed.py`);
  * decode: sentences/s translating the first --sentences sentences of test2016 with greedy
    search and with beam search (--beam_size, default 4; GNMT length penalty 0.6), batches of
    64, timed on
    a second pass so compilation is excluded. With --workdir the run's trained model (which
    stops at EOS like a real translation); without it, an untrained model of the config,
    which seldom emits EOS and so decodes to max_len: a worst case.

  GENLAB_RAW_DATA=DIR python -m experiments.benchmark_translate [--workdir=RUN]   # DIR/multi30k/*.gz

Run it when the machine is quiet, one benchmark at a time; report the host's `cpu family`.
"""

from __future__ import annotations

import time

import jax
from absl import app, flags

from experiments import train_speed
from experiments.configs import translate_multi30k
from train import loop
from train import run_loader
from train import sample as sample_lib  # noqa: F401 (defines the sampling flags this command reads)
from train import text

_STEPS = flags.DEFINE_integer('train_steps', 5, 'Train steps per timed chunk.')
_CHUNKS = flags.DEFINE_integer('chunks', 3, 'Timed chunks (the median is reported).')
_TRAIN = flags.DEFINE_bool('train', True, 'Benchmark the train step.')
_DECODE = flags.DEFINE_bool('decode', True, 'Benchmark decoding.')
_SENTENCES = flags.DEFINE_integer('sentences', 128, 'test2016 sentences per decode timing.')
# --workdir (a trained translate run) and --beam_size (default 4) are train.sample's flags.


def bench_train(config) -> dict[str, float]:
  r = train_speed.measure(config, steps=_STEPS.value, chunks=_CHUNKS.value)
  return {**r, 'tokens_per_s': r['items_per_s']}


def bench_decode(config) -> dict[str, float]:
  if flags.FLAGS.workdir:
    family, models, _ = run_loader.load_models(flags.FLAGS.workdir)
    config = family.config
  else:
    setup = loop.setup(config)
    family = setup.family
    models = setup.builder.models(*jax.device_get(
        (lambda s: (s['params'], s['rest']))(setup.builder.init(setup.shardings))))
  src = text.load_multi30k(config.data.raw_dir, 'test2016', config.data.source)
  src = src[:_SENTENCES.value]
  out = {}
  beam_size = flags.FLAGS.beam_size or 4
  for name, beam in (('greedy', 1), (f'beam{beam_size}', beam_size)):
    family.translate(models['model'], src, beam_size=beam, length_penalty=0.6)  # compile
    t = time.perf_counter()
    family.translate(models['model'], src, beam_size=beam, length_penalty=0.6)
    out[f'{name}_sentences_per_s'] = len(src) / (time.perf_counter() - t)
  return out


def main(argv):
  del argv
  print(f'devices: {jax.devices()}')
  config = translate_multi30k.get_config()
  if _TRAIN.value:
    r = bench_train(config)
    print(f'train {config.model.to_dict()} batch {config.batch_size} rows: '
          f'{r["ms_per_step"]:.0f} ms/step | {r["tokens_per_s"]:,.0f} real tokens/s | '
          f'{r["gflops_per_step"]:.2f} GFLOP/step (XLA cost analysis) | matmul peak '
          f'{r["peak_gflops"]:.1f} GFLOP/s | MFU {100 * r["mfu"]:.1f}% | '
          f'compile {r["compile_s"]:.1f}s')
  if _DECODE.value:
    r = bench_decode(config)
    print(f'decode {_SENTENCES.value} test2016 sentences '
          f'({"trained: " + flags.FLAGS.workdir if flags.FLAGS.workdir else "untrained"}): ' +
          ' | '.join(f'{k} {v:.1f}' for k, v in r.items()))


if __name__ == '__main__':
  app.run(main)
