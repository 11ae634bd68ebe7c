r"""Dense retriever (a BERT-architecture bi-encoder) on the generated knowledge task.

Default (no ARG): the knowledge task of 1000 fictional people (800 train, 100 val, 100 test;
5 fact documents and 3 fact-free mention documents each: 8000 documents, 15000 questions;
train/knowledge.py), a byte-level BPE vocabulary of 2000 trained on the documents and train
questions, one shared encoder of 4 layers, 4 heads, width 128 (BERT's, models/bert.py) reading
at most 32 tokens, mean-pooled and normalised, trained with in-batch negatives plus one hard
negative per question (batch 64 distinct facts, so 128 passages; temperature 0.05), dropout 0.1,
1500 steps, AdamW lr 1e-3 (100 warmup steps, cosine to 1e-5), weight decay 0.01.
  Command:  python -m train --config=experiments/configs/retriever_knowledge.py --workdir=/tmp/ret
            python -m train.evaluate --workdir=/tmp/ret [--split=test]
  Hardware: 2-core CPU (AMD Zen 4, cpu family 25), beside another run for its first 2.6 min.
  Runtime:  14.6 min wall, 1007 s user + 382 s system CPU time; evaluation 16 s wall.
  Result:   val recall@1 / @5: dense 96.3% / 99.7%, BM25 35.5% / 83.7% (test: dense 93.9% /
            98.9%, BM25 36.2% / 82.1%); experiments/README.md ("Retrieval").

ARG `tiny`: a smoke run (60 people, 2 layers, width 32, vocab 400, 8 steps): about 30 s of CPU
time, most of it compiling.

Start from a BERT run of the same model shape (experiments/configs/bert_multi30k.py's default
has it; its tokenizer is then used): --config.init_from=BERT_RUN_DIR.
"""

from ml_collections import config_dict

from experiments.configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.family = 'retriever'
  c.seed = 0
  c.total_steps = 1500
  c.batch_size = 64
  c.log_every = 100
  c.eval_every = 500
  c.checkpoint_every = 500
  c.temperature = 0.05
  c.hard_negatives = True   # one hard negative passage per row (train/families/retriever.py)
  c.data.name = 'knowledge'
  c.data.task_seed = 0
  c.data.num_entities = 1000
  c.data.val_entities = 100
  c.data.test_entities = 100
  c.data.mentions = 3   # documents naming a person that state none of the facts
  c.data.vocab_size = 2000
  c.model = dict(max_len=32, num_layers=4, num_heads=4, embed_dim=128, dropout=0.1,
                 dtype='float32')
  c.model.init_std = config_dict.placeholder(float)   # None: 1/sqrt(embed_dim)
  c.model.attention = config_dict.placeholder(str)    # None: einsum on CPU, else XLA's fused
  c.model.dropout_bits = 32   # dropout masks: 32 bernoulli; 8 or 16 cheaper (models.layers.dropout)
  c.optimizer.update(lr=1e-3, schedule='cosine', warmup_steps=100, decay_steps=1500,
                     min_lr=1e-5, b1=0.9, b2=0.98, weight_decay=0.01, grad_clip=1.0)
  c.sharding.rules = common.MEGATRON_RULES   # with --config.mesh.tensor=N
  c.sharding.divides = (('tensor', 'model.num_heads'),)
  if arg is None:
    return c
  if arg == 'tiny':
    c.total_steps = c.optimizer.decay_steps = 8
    c.optimizer.warmup_steps = 2
    c.batch_size = 16
    c.log_every = 2
    c.eval_every = 4
    c.checkpoint_every = 4
    c.data.num_entities = 60
    c.data.val_entities = 8
    c.data.test_entities = 8
    c.data.vocab_size = 400
    c.model.update(max_len=40, num_layers=2, num_heads=2, embed_dim=32)
  else:
    raise ValueError(f'unknown ARG {arg!r} (use tiny)')
  return c
