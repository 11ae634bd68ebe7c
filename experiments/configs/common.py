"""Keys every family's config shares, with their defaults."""

import ml_collections
from ml_collections import config_dict


# Megatron tensor parallelism for the models/layers.py transformers (GPT, BERT, translation),
# active with --config.mesh.tensor=N: the attention input projections (self-attention qkv,
# cross-attention q and kv; head-major columns) and the MLP's fc split by columns, every output
# projection by rows, so each device computes whole heads and a slice of the MLP hidden layer,
# with one all-reduce after each projection. Pair with sharding.divides = (('tensor',
# 'model.num_heads'),). LoRA adapters (models/lora.py: x A B with A [in, r], B [r, out]) follow
# their kernel: under a column-split kernel B is split by columns and A replicated (x A is
# computed whole on every device), under a row-split kernel A is split by rows (x A is then
# all-reduced, r numbers per token) and B replicated. DoRA's magnitudes (one per output column)
# split like the bias.
MEGATRON_RULES = (
    (r'attn/(qkv|q|kv)/(kernel|lora/lora_b)$', (None, 'tensor')),
    (r'attn/(qkv|q|kv)/(bias|lora/lora_magnitude)$', ('tensor',)),
    (r'attn/proj/(kernel|lora/lora_a)$', ('tensor', None)),
    (r'mlp/fc/(kernel|lora/lora_b)$', (None, 'tensor')),
    (r'mlp/fc/(bias|lora/lora_magnitude)$', ('tensor',)),
    (r'mlp/proj/(kernel|lora/lora_a)$', ('tensor', None)),
)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.family = ''
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 64              # global, over all devices and processes
  c.grad_accum_steps = 1         # micro-batches per step (the batch is split, grads averaged)
  c.log_every = 100
  c.eval_every = 500             # 0: only at the end
  c.checkpoint_every = 1000      # 0: only at the end (and on SIGTERM)
  c.keep_checkpoints = 3
  c.sample_every = 0             # 0: samples only at the end
  c.ema_decay = 0.0              # 0: no EMA; else EMA params are used for sampling
  c.profile_steps = ''           # 'START,COUNT': a jax.profiler trace of those steps in DIR/profile
  # Fine-tuning (train/tune.py). init_from: 'RUN_DIR[:STEP]' starts a NEW run from another run's
  # params (latest checkpoint, or STEP), matched by param path; params new in this model (e.g.
  # LoRA adapters) keep their fresh init. A workdir with its own checkpoints always resumes
  # from them instead: init_from only seeds a run's first start.
  c.init_from = ''
  # 'all' | 'lora' (the LoRA adapters only) | a regex searched in '/'-joined param paths such as
  # 'model/blocks/0/attn/qkv/kernel'. Frozen params get no gradient and no optimizer state;
  # with init_from, no place in the checkpoints either (train/tuned_checkpoint.py).
  c.trainable = 'all'
  # LoRA adapters (models/lora.py) on the nnx.Linear modules whose paths (e.g.
  # 'model/blocks/0/attn/qkv') match `targets`; rank 0: none. Output x W + (alpha / rank) x A B.
  # nnx.Embed modules that match (e.g. 'model/wte') get a low-rank update of their table, of
  # rank embed_rank (0: rank), at the same alpha / rank. b_lr_ratio: B's learning rate over
  # A's (LoRA+, train/tune.py's lora_plus; 1: plain LoRA). dora: the Linears' adapters are
  # DoRA's (models/lora.py: a learned magnitude per output column, one more param each).
  c.lora = ml_collections.ConfigDict(dict(
      rank=0, alpha=8.0, targets=r'(attn/(qkv|proj)|mlp/(fc|proj))$', embed_rank=0,
      b_lr_ratio=1.0, dora=False))
  # Pruning (train/prune.py) of the trained networks' params matching `params` (default: every
  # Linear/Conv kernel), with masks fixed at the run's first start (from init_from's weights):
  # method 'none' | 'magnitude' (global, unstructured: `sparsity` in [0, 1) of them set to 0) |
  # '2:4' (2 of every 4 consecutive weights along the input dimension kept).
  c.prune = ml_collections.ConfigDict(dict(method='none', sparsity=0.0, params=r'kernel$'))
  # int8 quantization with qwix (models/quantize.py) of the Linear and Conv layers: mode '' (none),
  # 'int8_weights' (weight-only) or 'int8' (weights and activations). qat=True trains with fake
  # quantization (e.g. from init_from); a trained run converts to int8 params with
  # `python -m train.quantize`, whose run directory has mode set and qat False.
  c.quantize = ml_collections.ConfigDict(dict(mode='', qat=False))
  c.data = ml_collections.ConfigDict()
  c.data.name = ''
  c.data.data_dir = config_dict.placeholder(str)   # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.raw_dir = config_dict.placeholder(str)    # raw files to prepare the dataset from
  c.optimizer = ml_collections.ConfigDict(dict(
      name='adamw', lr=1e-3, schedule='cosine', warmup_steps=100, decay_steps=1000, min_lr=1e-4,
      b1=0.9, b2=0.999, momentum=0.0, weight_decay=0.0, grad_clip=1.0))
  # Device mesh (train/sharding.py): the batch is split over data x fsdp; params, optimizer
  # state and EMA over fsdp; `sharding.rules` choose what tensor splits. -1: the rest.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding = ml_collections.ConfigDict()
  # (regex on a state path, (mesh axis or None per dim)); first match wins, FSDP fills a free dim.
  c.sharding.rules = ()
  # (mesh axis, config key): the axis must divide that config value (checked before compiling).
  c.sharding.divides = ()
  return c
