"""`python -m train.export --workdir=RUN --merge_lora --out=DIR`: a LoRA run as a plain run.

Loads RUN's latest checkpoint (EMA params where the run kept them), folds every LoRA adapter
into its base weight (W <- W + (alpha / rank) A B, `models.lora.merge_lora`) and writes DIR as
a run directory of the model without LoRA: config.json (lora.rank 0, trainable 'all'; its
`init_from` still names the base run), family.json and the family's run files (e.g.
tokenizer.json), and a checkpoint at RUN's step holding the merged params (a fresh optimizer
state), which `train.sample`, `train.evaluate` and `python -m train` (as a resume) accept.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from models import lora as lora_lib
from train import cli
from train import config as config_lib
from train import loop
from train import run_loader
from train import sample
from train import sharding as sharding_lib
from train import storage
from train import tune
from train.errors import UserError

# --workdir (the LoRA run) and --out (the run directory to write, which must not hold a run)
# are train.sample's flags, which this command shares.
_MERGE_LORA = flags.DEFINE_bool('merge_lora', False, 'Fold the LoRA adapters into the weights.')


def merge_lora_run(workdir: str, out: str) -> str:
  """Writes the merged run to `out`; returns a one-line summary."""
  config_path = storage.join(workdir, 'config.json')
  if storage.isfile(config_path):
    config = config_lib.from_json(storage.read_text(config_path))
    if tune.lora_rank(config) < 1:
      raise UserError(f'--workdir={workdir}: not a LoRA run (config.lora.rank is 0): nothing '
                      'to merge')
  if storage.exists(storage.join(out, 'checkpoints')) or storage.exists(
      storage.join(out, 'config.json')):
    raise UserError(f'--out={out}: already holds a run; give a new directory')
  family, models, step = run_loader.load_models(workdir)
  config = config_lib.from_json(storage.read_text(config_path))
  merged = {name: lora_lib.merge_lora(model) for name, model in models.items()}

  plain = config_lib.from_json(config_lib.to_json(config))
  plain.lora.rank = 0
  plain.trainable = 'all'
  builder = loop.StateBuilder(family, plain)
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = builder.init(jax.tree.map(lambda _: one_device, builder.abstract))
  new_params = {}
  for name, model in merged.items():
    _, params, _ = nnx.split(model, nnx.Param, ...)
    got = {sharding_lib.leaf_path(p): x
           for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    want = state['params'][name]
    paths = [sharding_lib.leaf_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(want)[0]]
    if sorted(got) != sorted(paths):
      raise UserError(f'--workdir={workdir}: network {name!r} does not merge into the plain '
                      f'model (params {sorted(set(got) ^ set(paths))[:4]} differ)')
    new_params[name] = jax.tree.unflatten(jax.tree.structure(want), [got[p] for p in paths])
  state = dict(state, params=new_params, step=jnp.asarray(step, jnp.int32))
  if 'ema' in state:
    state['ema'] = {n: new_params[n] for n in state['ema']}
  sample.write_run(out, plain, family, state, step,
                   {'merged_from': f'{storage.absolute(workdir)}:{step}'})
  return f'merged the LoRA adapters of {workdir} (step {step}) into {out}'


def main(argv):
  workdir, out = sample.workdir_and_out(argv)
  if not _MERGE_LORA.value:
    raise UserError('nothing to export: give --merge_lora')
  print(merge_lora_run(workdir, out), flush=True)


if __name__ == '__main__':
  cli.run(main)
