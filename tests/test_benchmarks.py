"""The benchmark scripts' own pieces build and run (they have no other test, and a family
change once broke them unnoticed)."""

import jax
import numpy as np

from experiments.benchmark_gpt import SyntheticGPT
from experiments.configs import gpt_shakespeare
from models import rngs as rngs_lib


def test_synthetic_gpt_builds_at_its_vocabulary():
  config = gpt_shakespeare.get_config('tiny')
  config.batch_size = 4
  family = SyntheticGPT(config, vocab_size=37)
  family.setup_data(0, 1)
  batch = family.train_batch(0)
  assert batch['inputs'].shape == (4, config.model.block_size)
  assert batch['inputs'].min() >= 0 and batch['inputs'].max() < 37
  assert len(np.unique(batch['inputs'])) > 30  # uniform over the 37 ids, not a constant
  model = family.make_models(rngs_lib.rngs(jax.random.key(0)))['model']
  assert model.wte.embedding.shape == (37, config.model.embed_dim)
  logits = np.asarray(model(batch['inputs']))
  assert logits.shape == (4, config.model.block_size, 37) and np.isfinite(logits).all()
