r"""RAG generator (family rag_gpt): a GPT that answers questions about fictional people from
retrieved passages (train/knowledge.py's task, train/rag.py's prompts).

Default (no ARG): the knowledge task of retriever_knowledge.py (1000 people: 800 train, 100 val,
100 test, 8000 documents; seed 0), a byte-level BPE vocabulary of 2000 trained on the train
people's documents and questions, a GPT of 4 layers, 4 heads, width 128 (1.07M params) over 96
positions, no dropout; each train question (12000) read with its top 5 passages (best first,
[SEP] between them, cut to fit), the retriever drawn per row from BM25 and the dense retriever of
--config.rag.retriever_run (a retriever_knowledge.py run), the gold passage not forced in; the
loss on the answer tokens only. 1200 steps of 16 rows, AdamW lr 2e-3 (100 warmup steps, cosine
to 2e-4), weight decay 0.1.
ARG `closed_book`: the same network reading the question alone (config.rag.top_k=0), over 48
positions. ARG `tiny` (alone or after a comma): a smoke run (60 people, 2 layers, width 32, BM25
only, 6 steps).
  Command:  python -m train --config=experiments/configs/rag_knowledge.py --workdir=/tmp/rag \
                --config.rag.retriever_run=/tmp/ret
            python -m train --config=experiments/configs/rag_knowledge.py:closed_book \
                --workdir=/tmp/closed_book
            python -m train.sample --workdir=/tmp/rag --prompt="Where was Ilsa Marrow born?" \
                [--retriever=dense|bm25|none --top_k=5]
            python -m experiments.compare_rag --rag=/tmp/rag --closed_book=/tmp/closed_book
  Hardware: 2-core CPU (AMD Zen 4, cpu family 25), shared with one other training run.
  Runtime:  6.9 min wall, 300 s user + 105 s system CPU (closed book: 2.6 min wall, 138 s user
            + 11 s system; compare_rag: 2.3 min wall, 128 s user + 4 s system).
  Result:   (/tmp/ret: retriever_knowledge.py's default run) on the 1500 test questions, exact
            match / token F1: RAG + dense 81.4% / 83.9%, RAG + BM25 64.4% / 68.6%, RAG + the
            oracle passage 93.1% / 94.2%, closed book 3.1% / 5.4% (chance: 4.0% / 4.9%); the
            table: experiments/README.md ("Retrieval-augmented generation").
"""

from ml_collections import config_dict

from experiments.configs import common


def get_config(arg: str | None = None):
  words = [w for w in (arg or '').split(',') if w]
  if set(words) - {'closed_book', 'tiny'}:
    raise ValueError(f'unknown ARG {arg!r} (use closed_book and/or tiny)')
  c = common.base_config()
  c.family = 'rag_gpt'
  c.seed = 0
  c.total_steps = 1200
  c.batch_size = 16
  c.log_every = 100
  c.eval_every = 400
  c.eval_batches = 20
  c.checkpoint_every = 400
  c.data.name = 'knowledge'
  c.data.tokenizer = 'subword'
  c.data.task_seed = 0
  c.data.num_entities = 1000
  c.data.val_entities = 100
  c.data.test_entities = 100
  c.data.mentions = 3   # documents naming a person that state none of the facts
  c.data.vocab_size = 2000
  c.rag = dict(top_k=5, train_retriever='mix', retriever_run='', answer_tokens=8)
  c.model = dict(block_size=96, num_layers=4, num_heads=4, embed_dim=128, dropout=0.0,
                 dtype='float32')
  c.model.init_std = config_dict.placeholder(float)
  c.model.attention = config_dict.placeholder(str)  # None: einsum on CPU, else XLA; or 'cudnn'
  c.model.dropout_bits = 32   # dropout masks: 32 bernoulli; 8 or 16 cheaper (models.layers.dropout)
  c.optimizer.update(lr=2e-3, schedule='cosine', warmup_steps=100, decay_steps=1200,
                     min_lr=2e-4, b1=0.9, b2=0.99, weight_decay=0.1, grad_clip=1.0)
  c.sharding.rules = common.MEGATRON_RULES   # with --config.mesh.tensor=N
  c.sharding.divides = (('tensor', 'model.num_heads'),)
  if 'closed_book' in words:
    c.rag.top_k = 0
    c.model.block_size = 48
  if 'tiny' in words:
    c.total_steps = c.optimizer.decay_steps = 6
    c.optimizer.warmup_steps = 1
    c.batch_size = 8
    c.log_every = 2
    c.eval_every = 3
    c.eval_batches = 1
    c.checkpoint_every = 3
    c.data.num_entities = 60
    c.data.val_entities = 8
    c.data.test_entities = 8
    c.data.vocab_size = 400
    c.rag.update(top_k=min(c.rag.top_k, 2), train_retriever='bm25', answer_tokens=16)
    # (A vocabulary of 400 spells a question in up to ~32 tokens.)
    c.model.update(block_size=96 if c.rag.top_k else 64, num_layers=2, num_heads=2,
                   embed_dim=32)
  return c
