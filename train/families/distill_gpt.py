"""Knowledge distillation of a GPT (Hinton et al. 2015, "Distilling the Knowledge in a Neural
Network"): a small student trained on the data and on a frozen, larger teacher's softened
next-token distributions.

Networks: 'model' (the student, config.model; the only one with an optimizer, so the only one
trained, EMA'd and pruned) and 'teacher' (a GPT of config.teacher_model's shape), whose weights
the loop reads at the run's first start from the run config.distill.teacher = 'RUN_DIR[:STEP]'
(`Family.networks_from_runs`; its family.json must equal this run's, so a teacher with another
vocabulary is refused). Both are checkpointed, so a resumed run needs no teacher directory.

Loss per token (config.distill.alpha = a, config.distill.temperature = T):
  a * CE(labels, softmax(z_s)) + (1 - a) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
T^2 keeps the soft term's gradient magnitude comparable across T (the gradient of the KL term
scales as 1/T^2; Hinton et al., section 2). Logged: `ce`, `kl` (the unscaled KL) and `loss`.

Everything else is the GPT family's (data, evaluation, sampling): eval and `train.evaluate`
score the student's cross-entropy on the validation windows, and `train.sample` samples the
student, so a distillation run directory reads like a GPT run's.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx

from models import gpt as gpt_lib
from train.errors import UserError
from train.families.gpt import GPTFamily

TEACHER = 'teacher'


class DistillGPTFamily(GPTFamily):
  """config.teacher_model: the teacher GPT's shape (the keys of config.model); config.distill:
  teacher ('RUN_DIR[:STEP]' of a GPT run on the same vocabulary), alpha (weight of the
  cross-entropy with the labels, in [0, 1]), temperature (T > 0)."""

  name = 'distill_gpt'

  def __init__(self, config):
    super().__init__(config)
    d = config.distill
    if not str(d.get('teacher') or ''):
      raise UserError('config.distill.teacher: not set; give the teacher run\'s directory, '
                      '--config.distill.teacher=RUN_DIR[:STEP]')
    if not 0.0 <= float(d.alpha) <= 1.0:
      raise UserError(f'config.distill.alpha={d.alpha}: must be in [0, 1]')
    if not float(d.temperature) > 0.0:
      raise UserError(f'config.distill.temperature={d.temperature}: must be > 0')
    t = config.teacher_model
    if t.embed_dim % t.num_heads:
      raise UserError(f'config.teacher_model.embed_dim={t.embed_dim} is not divisible by '
                      f'config.teacher_model.num_heads={t.num_heads}')
    if t.block_size < self.row_tokens():
      raise UserError(f'config.teacher_model.block_size={t.block_size}: shorter than the '
                      f'student\'s windows ({self.row_tokens()} tokens)')

  def make_models(self, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    # The teacher's init is overwritten by its run's weights at the start.
    return {**super().make_models(rngs), TEACHER: self.build_gpt(self.config.teacher_model, rngs)}

  def networks_from_runs(self) -> dict[str, tuple[str, str, str]]:
    return {TEACHER: (str(self.config.distill.teacher), 'model', 'config.distill.teacher')}

  def loss(self, models, batch, rng, *, train: bool):
    if not train or TEACHER not in models:
      return super().loss(models, batch, rng, train=train)  # eval: the student's CE
    d = self.config.distill
    alpha, temperature = float(d.alpha), float(d.temperature)
    student = models['model'](batch['inputs'], dropout_key=rng)  # [batch, seq, vocab] f32
    # The teacher is frozen (no optimizer): stop_gradient also spares the backward pass.
    teacher = jax.lax.stop_gradient(models[TEACHER](batch['inputs']))
    ce = optax.softmax_cross_entropy_with_integer_labels(student, batch['targets']).mean()
    kl = distillation_kl(student, teacher, temperature).mean()
    loss = alpha * ce + (1.0 - alpha) * temperature ** 2 * kl
    return loss, {'ce': ce, 'kl': kl}

  def flops_per_step(self, abstract_params) -> float:
    """The student's training FLOPs plus the teacher's forward pass (a third of 6N + 12LTd)."""
    t = self.config.teacher_model
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    teacher = abstract_params[TEACHER]
    n = size(teacher) - size(teacher['wpe'])
    forward = gpt_lib.flops_per_token(n, t.num_layers, self.row_tokens(), t.embed_dim) / 3
    return super().flops_per_step(abstract_params) + self.items_per_step() * forward


def distillation_kl(student_logits: Any, teacher_logits: Any, temperature: float) -> jax.Array:
  """KL(softmax(teacher / T) || softmax(student / T)) per position: `[...]` from logits
  `[..., vocab]` (optax's kl_divergence_with_log_targets is sum p_t (log p_t - log p_s))."""
  log_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  log_teacher = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  return optax.losses.kl_divergence_with_log_targets(log_student, log_teacher)
