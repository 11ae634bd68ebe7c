r"""genlab against PyTorch peers, side by side in one process: speed as ratios, never absolute.

Each row times genlab and its peer in alternating chunks (genlab, peer, genlab, peer, ...) in
the same process, so a noisy, shared machine slows both sides alike; a chunk's time is a median
over --rounds rounds.
  * gpt: genlab's jitted GPT train step (train.loop's `make_train_step` on the default
    `gpt_shakespeare.py` config: 4 layers, width 128, block 64, batch 12, AdamW, clip 1.0)
    against a PyTorch GPT of the same architecture and init scheme written below (nanoGPT's
    model: pre-LN blocks, exact GELU, tied embeddings; AdamW with weight decay on matrices only,
    global-norm clipping), both compiled with `torch.compile` (as nanoGPT's `--compile=True`:
    the model compiled, the optimizer step eager) and eager. Same random tokens; FLOPs from
    nanoGPT's formula 6N + 12 L T d per token.
  * gpt_bf16 (only when asked for: `--only=gpt_bf16`): the same in mixed precision, bfloat16
    compute with float32 params and optimizer (genlab's `model.dtype='bfloat16'`, PyTorch's
    `torch.autocast('cpu', torch.bfloat16)`), with both frameworks' bf16 matmul peaks; meant
    for CPUs with AVX512-BF16 (the host line says whether this one has it).
  * unet: genlab's diffusion train step on `ddpm_mnist.py:cond` (eps loss, label dropout, AdamW,
    clip, EMA) against diffusers' `UNet2DModel` configured to the same architecture
    (`diffusers_unet`: the same widths, blocks, attention, time and class embeddings; the table
    prints both parameter counts) trained the same way, eager. Same MNIST batches.
  * ddim: 64 images by DDIM-50 (eta 0, guidance 1: one network call per step): genlab's jitted
    `lax.scan` sampler against diffusers' `DDIMScheduler` loop over that `UNet2DModel`
    (`torch.inference_mode`, eager).
A ratio > 1 means genlab is faster. The matmul peak of each framework (f32 1024^3, best of 5) and
the host's CPU family are printed with the table.

  pip install -e '.[peers]'    # torch (CPU) and diffusers: never in the core install
  TFDS_DATA_DIR=... python -m experiments.benchmark_peers [--rounds=3] [--only=gpt,unet,ddim]
  TFDS_DATA_DIR=... python -m experiments.benchmark_peers --only=gpt_bf16
  TFDS_DATA_DIR=... python -m experiments.benchmark_peers --only=unet --dropout_bits=8
  TFDS_DATA_DIR=... python -m experiments.benchmark_peers --only=unet,ddim --group_norm_sums=dot

Run one benchmark at a time (nothing else heavy on the machine).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from experiments.benchmark_gpt import SyntheticGPT
from experiments.configs import ddpm_mnist, gpt_shakespeare
from train import cli
from train import loop
from train import metrics as metrics_lib
from train import sharding as sharding_lib
from train.families.diffusion import DiffusionFamily

_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Alternating rounds; each side\'s median is used.')
_GPT_STEPS = flags.DEFINE_integer('gpt_steps', 30, 'GPT train steps per timed chunk.')
_UNET_STEPS = flags.DEFINE_integer('unet_steps', 4, 'UNet train steps per timed chunk.')
_ONLY = flags.DEFINE_list('only', ['gpt', 'unet', 'ddim'], 'Which rows to run.')
_COMPILE = flags.DEFINE_bool('torch_compile', True, 'Also time torch.compile for the GPT.')
_DROPOUT_BITS = flags.DEFINE_enum('dropout_bits', '32', ['8', '16', '32'],
                                  "genlab UNet's dropout masks (config.model.dropout_bits): 32, "
                                  "the config's, or cheaper 8- or 16-bit ones.")
_GROUP_NORM_SUMS = flags.DEFINE_enum(
    'group_norm_sums', 'reduce', ['reduce', 'dot'], "genlab UNet's GroupNorms "
    "(config.model.group_norm_sums): 'reduce' flax's, 'dot' sums over positions as dots.")


def host_cpu() -> str:
  fields = {}
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        key, _, value = line.partition(':')
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  family, model = fields.get('cpu family', '?'), fields.get('model', '?')
  zen = ''
  if family == '25' and model.isdigit():   # AMD's family 19h: Zen 3 or Zen 4 by model number
    number = int(model)
    if number in {*range(0x00, 0x10), *range(0x20, 0x30), *range(0x40, 0x60)}:
      zen = 'Zen 3'
    elif number in {*range(0x10, 0x20), *range(0x60, 0x80), *range(0xa0, 0xb0)}:
      zen = 'Zen 4'
  elif family == '26':
    zen = 'Zen 5'
  bf16 = ', avx512_bf16' if 'avx512_bf16' in fields.get('flags', '').split() else ''
  return (f'{fields.get("model name", platform.processor() or "?")}, cpu family {family} '
          f'model {model}{f" ({zen})" if zen else ""}{bf16}, {os.cpu_count()} logical cores')


def alternate(runners: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
  """Calls each runner (returns seconds per item) once per round, in turn; medians."""
  times = {name: [] for name in runners}
  for _ in range(rounds):
    for name, run in runners.items():
      times[name].append(run())
  return {name: statistics.median(t) for name, t in times.items()}


def _timed_chunk(step: Callable[[int], None], steps: int, sync: Callable[[], None]) -> float:
  t = time.perf_counter()
  for i in range(steps):
    step(i)
  sync()
  return (time.perf_counter() - t) / steps


# ---------------------------------------------------------------------------------------------
# PyTorch peers.
# ---------------------------------------------------------------------------------------------
def torch_gpt(torch, *, vocab_size, block_size, num_layers, num_heads, embed_dim):
  """nanoGPT's model with genlab's init: normal(1/sqrt(d)) weights and embeddings,
  normal(1/sqrt(d) / sqrt(2 L)) residual projections, zero biases, tied output embedding."""
  nn, F = torch.nn, torch.nn.functional
  std = embed_dim ** -0.5
  resid_std = std / math.sqrt(2 * num_layers)

  def linear(n_in, n_out, s):
    layer = nn.Linear(n_in, n_out)
    nn.init.normal_(layer.weight, std=s)
    nn.init.zeros_(layer.bias)
    return layer

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln1, self.ln2 = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
      self.qkv = linear(embed_dim, 3 * embed_dim, std)
      self.proj = linear(embed_dim, embed_dim, resid_std)
      self.fc = linear(embed_dim, 4 * embed_dim, std)
      self.fc_proj = linear(4 * embed_dim, embed_dim, resid_std)

    def forward(self, x):
      b, t, d = x.shape
      q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, num_heads, d // num_heads).unbind(2)
      y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                         v.transpose(1, 2), is_causal=True)
      x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
      return x + self.fc_proj(F.gelu(self.fc(self.ln2(x))))

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.wte = nn.Embedding(vocab_size, embed_dim)
      self.wpe = nn.Embedding(block_size, embed_dim)
      nn.init.normal_(self.wte.weight, std=std)
      nn.init.normal_(self.wpe.weight, std=std)
      self.blocks = nn.ModuleList([Block() for _ in range(num_layers)])
      self.ln_f = nn.LayerNorm(embed_dim)

    def forward(self, tokens, targets):
      x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
      for block in self.blocks:
        x = block(x)
      logits = self.ln_f(x) @ self.wte.weight.T
      return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

  return GPT()


def torch_adamw(torch, model, cfg):
  """AdamW as genlab's optimizer config: weight decay on >= 2-D params only."""
  decay = [p for p in model.parameters() if p.dim() >= 2]
  other = [p for p in model.parameters() if p.dim() < 2]
  return torch.optim.AdamW([{'params': decay, 'weight_decay': cfg.weight_decay},
                            {'params': other, 'weight_decay': 0.0}],
                           lr=cfg.lr, betas=(cfg.b1, cfg.b2))


def diffusers_unet(config, num_classes: int):
  """diffusers' UNet2DModel with the architecture of genlab's models/unet.py for `config.model`.

  Both: conv in; per level `num_res_blocks` ResNet blocks (GroupNorm, SiLU, 3x3 conv, time
  embedding added, GroupNorm, SiLU, dropout, 3x3 conv; 1x1 skip when widths change), single-head
  self-attention at the attention resolutions, a stride-2 conv between levels; middle res-attn-
  res; the mirror with num_res_blocks + 1 blocks per level on concatenated skips, nearest 2x
  upsampling + conv; GroupNorm, SiLU, conv out. Sinusoidal time embedding of width `channels`
  -> MLP to 4 * channels, plus a learned class embedding (num_classes + 1: the null class).
  """
  from diffusers import UNet2DModel  # pylint: disable=import-outside-toplevel
  m = config.model
  widths = tuple(m.channels * k for k in m.channel_mult)
  size = 28
  down, up, res = [], [], size
  for level in range(len(widths)):
    down.append('AttnDownBlock2D' if res in m.attention_resolutions else 'DownBlock2D')
    res //= 2 if level < len(widths) - 1 else 1
  for level in reversed(range(len(widths))):
    up.append('AttnUpBlock2D' if res in m.attention_resolutions else 'UpBlock2D')
    res *= 2 if level > 0 else 1
  return UNet2DModel(
      sample_size=size, in_channels=1, out_channels=1, layers_per_block=m.num_res_blocks,
      block_out_channels=widths, down_block_types=tuple(down), up_block_types=tuple(up),
      norm_num_groups=m.groups, attention_head_dim=widths[-1],  # one head, as genlab's
      num_class_embeds=num_classes + 1, dropout=m.dropout, time_embedding_type='positional',
      flip_sin_to_cos=True, freq_shift=0)


def torch_matmul_peak(torch, size=1024, repeats=5, dtype=None) -> float:
  a, b = torch.ones(size, size, dtype=dtype), torch.ones(size, size, dtype=dtype)
  a @ b
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - t)
  return 2 * size ** 3 / best


# ---------------------------------------------------------------------------------------------
# genlab sides.
# ---------------------------------------------------------------------------------------------
def genlab_train_runner(config, family, batches):
  """(chunk runner: seconds per step, compiled step, its StateBuilder, current state: () ->
  the train state as a pytree) on one device; the step runs as the loop runs it
  (`loop.TrainStep`, over the state's leaves)."""
  mesh = sharding_lib.make_mesh(config, jax.devices()[:1])
  builder = loop.StateBuilder(family, config)
  shardings = sharding_lib.state_shardings(builder.abstract, mesh)
  state = {'s': builder.init(shardings)}
  step = loop.TrainStep(builder, config, mesh, shardings)
  device_batches = [sharding_lib.put_batch(b, mesh) for b in batches]
  compiled = step.lower(state['s'], device_batches[0]).compile()
  state['s'] = step.flatten(state['s'])   # the loop's form: the state's leaves
  metrics = {}

  def one(i):
    state['s'], metrics['m'] = compiled(state['s'], device_batches[i % len(device_batches)])

  one(0)
  jax.block_until_ready(metrics['m'])
  runner = lambda n: _timed_chunk(one, n, lambda: jax.block_until_ready(metrics['m']))
  return runner, compiled, builder, lambda: step.unflatten(state['s'])


def _cost_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


# ---------------------------------------------------------------------------------------------
# Rows.
# ---------------------------------------------------------------------------------------------
def gpt_row(torch, bf16: bool = False) -> list[tuple[str, str, float, str]]:
  """The GPT rows; bf16: both compute in bfloat16 with float32 params and optimizer (genlab's
  `model.dtype='bfloat16'`, PyTorch's `torch.autocast('cpu', torch.bfloat16)` around the
  forward and loss)."""
  config = gpt_shakespeare.get_config()
  if bf16:
    config.model.dtype = 'bfloat16'
  family = SyntheticGPT(config, vocab_size=65)
  family.setup_data(0, 1)
  n = _GPT_STEPS.value
  batches = [family.train_batch(i) for i in range(n)]
  genlab, _, builder, _ = genlab_train_runner(config, family, batches)
  flops = family.flops_per_step(builder.abstract['params'])

  m = config.model
  make = lambda: torch_gpt(torch, vocab_size=65, block_size=m.block_size,
                           num_layers=m.num_layers, num_heads=m.num_heads,
                           embed_dim=m.embed_dim)
  data = [(torch.from_numpy(b['inputs']).long(), torch.from_numpy(b['targets']).long())
          for b in batches]

  def torch_runner(compiled: bool):
    torch.manual_seed(0)
    model = make()
    opt = torch_adamw(torch, model, config.optimizer)
    forward = torch.compile(model) if compiled else model

    def one(i):
      x, y = data[i % len(data)]
      with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
        loss = forward(x, y)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip)
      opt.step()

    _timed_chunk(one, 3, lambda: None)  # compile and warm up
    return lambda: _timed_chunk(one, n, lambda: None)

  runners = {'genlab': lambda: genlab(n), 'torch eager': torch_runner(False)}
  if _COMPILE.value:
    runners['torch.compile'] = torch_runner(True)
  t = alternate(runners, _ROUNDS.value)
  rows = []
  flops_note = f'{flops / 1e9:.3f} GFLOP/step both (6N + 12LTd)'
  for peer in ('torch.compile', 'torch eager'):
    if peer in t:
      rows.append((f'GPT train step{", bf16 compute" if bf16 else ""}, batch '
                   f'{config.batch_size} x {m.block_size}',
                   f'{peer} GPT', t[peer] / t['genlab'],
                   f'{1e3 * t["genlab"]:.1f} vs {1e3 * t[peer]:.1f} ms; {flops_note}'))
  return rows


def _norm_label(config) -> str:
  sums = config.model.group_norm_sums
  return '' if sums == 'reduce' else f', group_norm_sums={sums}'


def unet_rows(torch, which) -> list[tuple[str, str, float, str]]:
  from diffusers import DDIMScheduler, DDPMScheduler  # pylint: disable=import-outside-toplevel
  config = ddpm_mnist.get_config('cond')
  config.model.dropout_bits = int(_DROPOUT_BITS.value)
  config.model.group_norm_sums = _GROUP_NORM_SUMS.value
  family = DiffusionFamily(config)
  family.setup_data(0, 1)
  n = _UNET_STEPS.value
  batches = [family.train_batch(i) for i in range(n)]
  genlab, compiled, builder, current_state = genlab_train_runner(config, family, batches)
  genlab_params = loop.num_params(builder.abstract['params'])

  torch.manual_seed(0)
  model = diffusers_unet(config, family.num_classes)
  torch_params = sum(p.numel() for p in model.parameters())
  rows = []
  note = f'params {genlab_params:,} (genlab) vs {torch_params:,} (diffusers)'

  if 'unet' in which:
    noise_sched = DDPMScheduler(num_train_timesteps=config.diffusion.num_steps,
                                beta_schedule='squaredcos_cap_v2')
    opt = torch.optim.AdamW(model.parameters(), lr=config.optimizer.lr,
                            betas=(config.optimizer.b1, config.optimizer.b2),
                            weight_decay=config.optimizer.weight_decay)
    ema = [p.detach().clone() for p in model.parameters()]
    data = [(torch.from_numpy(b['image']).float().permute(0, 3, 1, 2) / 127.5 - 1.0,
             torch.from_numpy(b['label']).long()) for b in batches]
    gen = torch.Generator().manual_seed(0)

    def one(i):
      x0, labels = data[i % len(data)]
      t = torch.randint(0, config.diffusion.num_steps, (x0.shape[0],), generator=gen)
      noise = torch.randn(x0.shape, generator=gen)
      drop = torch.rand(labels.shape, generator=gen) < config.diffusion.label_dropout
      labels = torch.where(drop, torch.full_like(labels, family.num_classes), labels)
      pred = model(noise_sched.add_noise(x0, noise, t), t, class_labels=labels).sample
      loss = torch.nn.functional.mse_loss(pred, noise)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip)
      opt.step()
      with torch.no_grad():
        torch._foreach_lerp_(ema, list(model.parameters()), 1.0 - config.ema_decay)  # pylint: disable=protected-access

    model.train()
    _timed_chunk(one, 1, lambda: None)
    t = alternate({'genlab': lambda: genlab(n), 'diffusers': lambda: _timed_chunk(
        one, n, lambda: None)}, _ROUNDS.value)
    train_flops = _cost_flops(compiled)
    bits = config.model.dropout_bits
    bits = '' if bits == 32 else f', dropout_bits={bits}'
    bits += _norm_label(config)
    rows.append((f'UNet train step, batch {config.batch_size} (ddpm_mnist.py:cond{bits})',
                 'diffusers UNet2DModel, eager', t['diffusers'] / t['genlab'],
                 f'{1e3 * t["genlab"]:.0f} vs {1e3 * t["diffusers"]:.0f} ms; genlab '
                 f'{train_flops / 1e9:.1f} GFLOP/step (XLA cost analysis); {note}'))

  if 'ddim' in which:
    batch, steps = 64, 50
    state = current_state()
    graphdef, params = nnx.split(builder.models(builder.sampling_params(state),
                                                state['rest'])['model'])
    x_T = jax.random.normal(jax.random.key(0), (batch, *family.image_shape))
    labels = jnp.asarray(np.arange(batch) % family.num_classes, jnp.int32)
    sampler = family.sampler_fn('ddim', steps, 0.0, 1.0).lower(
        graphdef, params, x_T, labels, jax.random.key(1)).compile()
    genlab_run = lambda: _timed_chunk(
        lambda i: jax.block_until_ready(sampler(params, x_T, labels, jax.random.key(1))), 1,
        lambda: None) / batch
    sched = DDIMScheduler(num_train_timesteps=config.diffusion.num_steps,
                          beta_schedule='squaredcos_cap_v2', clip_sample=True)
    sched.set_timesteps(steps)
    x_torch = torch.from_numpy(np.array(x_T)).permute(0, 3, 1, 2).contiguous()
    labels_torch = torch.from_numpy(np.array(labels)).long()
    model.eval()

    def diffusers_sample(i):
      del i
      x = x_torch
      with torch.inference_mode():
        for t in sched.timesteps:
          eps = model(x, t, class_labels=labels_torch).sample
          x = sched.step(eps, t, x, eta=0.0).prev_sample

    diffusers_run = lambda: _timed_chunk(diffusers_sample, 1, lambda: None) / batch
    genlab_run()
    diffusers_run()
    t = alternate({'genlab': genlab_run, 'diffusers': diffusers_run}, _ROUNDS.value)
    forward = jax.jit(lambda p, x, tt, y: nnx.merge(graphdef, p)(x, tt, y)).lower(
        params, x_T, jnp.zeros((batch,), jnp.int32), labels).compile()
    rows.append((f'DDIM-50 sampling, {batch} images{_norm_label(config)}',
                 'diffusers DDIMScheduler, eager',
                 t['diffusers'] / t['genlab'],
                 f'{1 / t["genlab"]:.1f} vs {1 / t["diffusers"]:.1f} images/s; '
                 f'{steps * _cost_flops(forward) / 1e9:.0f} GFLOP per batch (genlab, XLA)'))
  return rows


def main(argv):
  del argv
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise SystemExit("benchmark_peers needs PyTorch and diffusers: pip install -e '.[peers]'")
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  which = set(_ONLY.value)
  unknown = which - {'gpt', 'gpt_bf16', 'unet', 'ddim'}
  if unknown:
    raise SystemExit(f'--only: unknown {sorted(unknown)} (known: gpt, gpt_bf16, unet, ddim)')
  rows = []
  if 'gpt' in which:
    rows += gpt_row(torch)
  if 'gpt_bf16' in which:
    rows += gpt_row(torch, bf16=True)
  if which & {'unet', 'ddim'}:
    rows += unet_rows(torch, which)
  jax_peak = metrics_lib.matmul_peak_flops(jax.devices()[:1])
  torch_peak = torch_matmul_peak(torch)
  print(f'host: {host_cpu()}; jax {jax.__version__}, torch {torch.__version__} '
        f'({torch.get_num_threads()} threads); median of {_ROUNDS.value} alternating rounds; '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  print(f'f32 1024^3 matmul peak: jax {jax_peak / 1e9:.0f} GFLOP/s, '
        f'torch {torch_peak / 1e9:.0f} GFLOP/s')
  if 'gpt_bf16' in which:
    jax_bf16 = metrics_lib.matmul_peak_flops(jax.devices()[:1], dtype=jnp.bfloat16)
    torch_bf16 = torch_matmul_peak(torch, dtype=torch.bfloat16)
    print(f'bf16 1024^3 matmul peak: jax {jax_bf16 / 1e9:.0f} GFLOP/s, '
          f'torch {torch_bf16 / 1e9:.0f} GFLOP/s')
  print()
  print('| what | peer | genlab speed / peer speed | detail |')
  print('|---|---|---|---|')
  for what, peer, ratio, detail in rows:
    print(f'| {what} | {peer} | **{ratio:.2f}x** | {detail} |')


if __name__ == '__main__':
  cli.tune_host()  # as the train/sample/evaluate commands do
  app.run(main)
