r"""Knowledge distillation on Tiny Shakespeare (characters): family `distill_gpt`
(train/families/distill_gpt.py).

Default (no ARG): the student is gpt_shakespeare.py's default model and schedule (4 layers,
width 128, block 64, batch 12, 2000 steps), trained on
  alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T),  alpha 0.5, T 2,
with a frozen teacher of gpt_shakespeare.py:teacher's shape (6 layers, width 256) read from
that run's directory at the first start. Train the teacher first, then the student:
  python -m train --config=experiments/configs/gpt_shakespeare.py:teacher \
      --workdir=workdirs/gpt_teacher
  python -m train --config=experiments/configs/distill_gpt.py --workdir=workdirs/distill_gpt \
      --config.distill.teacher=workdirs/gpt_teacher
The student trained from scratch for as many steps is gpt_shakespeare.py's default run.
  Hardware: 2-core CPU. The full 2000 steps (after a 5000-step teacher) were not run. Measured
  instead, as experiments/compare_compression.py runs it by default: 1000 steps (schedule
  included) from the 2000-step teacher of gpt_shakespeare.py:teacher (val loss 1.717):
  Command:  python -m train --config=experiments/configs/distill_gpt.py \
                --workdir=workdirs/compression/distilled --config.total_steps=1000 \
                --config.optimizer.decay_steps=1000 --config.distill.teacher=workdirs/compression/teacher
  Runtime:  3.7 min wall (Zen 4 host, `cpu family 25`, sharing its 2 cores with another
            training run), inside `compare_compression --train_missing`.
  Result:   student val loss 1.820 at step 1000, against 1.925 for the same student trained
            from scratch for 1000 steps (gpt_shakespeare.py with --config.total_steps=1000
            --config.optimizer.decay_steps=1000: 1.7 min wall).
  Reading the run: metrics.jsonl logs `ce`, `kl` and `loss` per logged step; eval rows hold the
  student's validation cross-entropy (`eval/loss`), as a GPT run's do; `python -m train.evaluate`
  and `python -m train.sample` on the run directory score and sample the student.

ARG `tiny`: a smoke run of seconds: student 2 layers x width 16, teacher of
gpt_shakespeare.py:tiny's shape (2 layers x width 32), 20 steps.
  python -m train --config=experiments/configs/gpt_shakespeare.py:tiny --workdir=/tmp/teacher
  python -m train --config=experiments/configs/distill_gpt.py:tiny --workdir=/tmp/student \
      --config.distill.teacher=/tmp/teacher
"""

import ml_collections

from experiments.configs import gpt_shakespeare


def get_config(arg: str | None = None):
  if arg not in (None, 'tiny'):
    raise ValueError(f'unknown ARG {arg!r} (use tiny)')
  c = gpt_shakespeare.get_config(arg)
  c.family = 'distill_gpt'
  c.teacher_model = gpt_shakespeare.get_config('teacher' if arg is None else 'tiny').model
  c.distill = ml_collections.ConfigDict(dict(
      teacher='',        # RUN_DIR[:STEP] of a GPT run on the same vocabulary (required)
      alpha=0.5,         # weight of the cross-entropy with the labels
      temperature=2.0))  # T of the softened distributions
  if arg == 'tiny':
    c.model.update(num_layers=2, num_heads=2, embed_dim=16)
  return c
