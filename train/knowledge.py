"""A knowledge task where retrieval must matter: facts about fictional people, one per document.

`generate(seed, num_entities, val_entities, test_entities)` builds the whole collection from a
seed (the same arguments give the same collection, record for record):

* **Entities**: people whose names are composed from seeded syllable lists ("Ilsa Marrow"; full
  names are unique, first and last names repeat across people), each with five facts:
  `birthplace` (a fictional town), `birth_year` (1900-1999), `profession`, `employer` (a
  fictional company) and `instrument`. Entities are split into train / val / test by entity, so
  no val or test fact is about a person seen in training.
* **Documents** (the passages a retriever searches): one per fact, phrased by one of several
  templates per attribute (so a question's words are often not the document's: "Where was X
  born?" against "X's hometown is Y."), sometimes followed by a sentence about the person's
  character that holds no fact. The answer to a question is stated in exactly one document; the
  same value (a town, a profession) is also stated in other people's documents.
  `mentions` more documents per person name them but state none of the five facts (a pastime, a
  trait, a friend from the same split: attribute 'mention'), so a person's name is in more
  documents than the five a question can be about and matching the name alone does not find
  the answer's document among the top five (as in a real collection, where an entity is
  mentioned far more often than any one fact about it is stated).
* **Questions**: every fact asked with every question template of its attribute (three each);
  `answer` is the value as the document writes it, `gold_document` the one document stating it.

Records (plain dataclasses; `to_json` / `from_json` write and read them as one JSON object with
the generation arguments under "args" and lists "entities", "documents", "questions"):

  Entity    id, name, split ('train' | 'val' | 'test'), facts {attribute: value}
  Document  id, entity (id), attribute, text
  Question  id, entity (id), attribute, text, answer, gold_document (a Document id)

Documents are numbered in a seeded shuffled order (a document's id says nothing about its
entity), questions in entity order.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from train import storage
from train.errors import UserError

ATTRIBUTES = ('birthplace', 'birth_year', 'profession', 'employer', 'instrument')
SPLITS = ('train', 'val', 'test')

_FIRST_SYLLABLES = ('il', 'sa', 'ma', 'ro', 've', 'ta', 'no', 'ri', 'ka', 'len', 'dor', 'mi',
                    'bel', 'tho', 'ra', 'fen', 'lo', 'na', 'jus', 'ti', 'wen', 'da', 'es', 'cor')
_LAST_SYLLABLES = ('mar', 'row', 'hal', 'vek', 'sten', 'qui', 'lor', 'ban', 'dell', 'ost',
                   'wyn', 'tar', 'rim', 'gol', 'bre', 'nash', 'ket', 'ul', 'far', 'pim')
_PLACE_SYLLABLES = ('tov', 'en', 'brak', 'sil', 'mo', 'dra', 'kel', 'vash', 'ur', 'pel', 'zan',
                    'or', 'gri', 'fal')
_PLACE_SUFFIXES = ('burg', 'ford', 'holm', 'wick', 'stad', 'port', 'mere', 'dale')
_COMPANY_SYLLABLES = ('kav', 'ro', 'zel', 'tri', 'nox', 'am', 'bor', 'qua', 'lin', 'sy', 'vo',
                      'det')
_COMPANY_SUFFIXES = ('Labs', 'Mills', 'Foundry', 'Press', 'Guild', 'Shipyards')
PROFESSIONS = ('baker', 'engineer', 'cartographer', 'glassblower', 'pilot', 'botanist',
               'archivist', 'tailor', 'astronomer', 'surgeon', 'carpenter', 'chemist', 'weaver',
               'jeweller', 'librarian', 'geologist')
INSTRUMENTS = ('cello', 'harp', 'oboe', 'trumpet', 'violin', 'accordion', 'banjo', 'clarinet',
               'flute', 'marimba', 'bassoon', 'sitar', 'ukulele', 'tuba', 'harmonica', 'lute')
_TRAITS = ('patient', 'cheerful', 'meticulous', 'generous', 'curious', 'quiet', 'stubborn',
           'witty', 'kind', 'restless')

# {name}: the full name; {value}: the fact; {a}: 'a' or 'an' before the value.
DOCUMENT_TEMPLATES = {
    'birthplace': ('{name} was born in {value}.', "{name}'s hometown is {value}.",
                   'The birthplace of {name} is {value}.', '{value} is where {name} was born.'),
    'birth_year': ('{name} was born in {value}.', '{name} came into the world in {value}.',
                   'The year {name} was born was {value}.', 'In {value}, {name} was born.'),
    'profession': ('{name} works as {a} {value}.', 'By trade, {name} is {a} {value}.',
                   '{name} earns a living as {a} {value}.', "{name}'s profession: {value}."),
    'employer': ('{name} is employed by {value}.', '{name} works for {value}.',
                 '{value} employs {name}.', 'The employer of {name} is {value}.'),
    'instrument': ('{name} plays the {value}.', '{name} has played the {value} since childhood.',
                   'The instrument {name} plays is the {value}.',
                   'In the evenings, {name} practises the {value}.'),
}
QUESTION_TEMPLATES = {
    'birthplace': ('Where was {name} born?', 'What is the birthplace of {name}?',
                   'Which town is {name} from?'),
    'birth_year': ('When was {name} born?', 'In which year was {name} born?',
                   'What year was {name} born in?'),
    'profession': ('What does {name} do for a living?', 'What is the profession of {name}?',
                   "What is {name}'s job?"),
    'employer': ('Who employs {name}?', 'Which company does {name} work for?',
                 'Where does {name} work?'),
    'instrument': ('What instrument does {name} play?', 'Which instrument does {name} play?',
                   'What does {name} play?'),
}
_TRAIT_SENTENCE = '{first} is known to friends as {trait}.'
# Documents that name a person and state none of the facts ({other}: another person's name).
MENTION_TEMPLATES = ('{name} spends the weekends {pastime}.',
                     'A neighbour describes {name} as {trait}.',
                     '{name} and {other} met at school.',
                     'Few people know that {name} once lived abroad.',
                     '{name} is learning to cook from {other}.')
_PASTIMES = ('hiking in the hills', 'playing chess', 'gardening', 'reading novels', 'fishing',
             'painting landscapes', 'sailing', 'birdwatching')
MENTION = 'mention'   # the attribute of a mention document


@dataclasses.dataclass(frozen=True)
class Entity:
  id: int
  name: str
  split: str
  facts: dict[str, str]


@dataclasses.dataclass(frozen=True)
class Document:
  id: int
  entity: int
  attribute: str
  text: str


@dataclasses.dataclass(frozen=True)
class Question:
  id: int
  entity: int
  attribute: str
  text: str
  answer: str
  gold_document: int


@dataclasses.dataclass
class Collection:
  args: dict[str, int]
  entities: list[Entity]
  documents: list[Document]
  questions: list[Question]

  def questions_of(self, split: str) -> list[Question]:
    """The questions about `split`'s entities."""
    if split not in SPLITS:
      raise UserError(f'split {split!r}: the knowledge task has {", ".join(SPLITS)}')
    return [q for q in self.questions if self.entities[q.entity].split == split]

  @property
  def passages(self) -> list[str]:
    """Every document's text, indexed by document id."""
    return [d.text for d in self.documents]

  def to_json(self) -> str:
    return json.dumps({'args': self.args,
                       'entities': [dataclasses.asdict(e) for e in self.entities],
                       'documents': [dataclasses.asdict(d) for d in self.documents],
                       'questions': [dataclasses.asdict(q) for q in self.questions]})

  @classmethod
  def from_json(cls, text: str) -> Collection:
    raw = json.loads(text)
    return cls(raw['args'], [Entity(**e) for e in raw['entities']],
               [Document(**d) for d in raw['documents']],
               [Question(**q) for q in raw['questions']])


def _word(rng: np.random.Generator, syllables: tuple[str, ...], count: int) -> str:
  return ''.join(syllables[i] for i in rng.integers(len(syllables), size=count))


def _unique(rng: np.random.Generator, make, count: int) -> list[str]:
  """`count` distinct strings from `make(rng)`, in the order first drawn."""
  out, seen = [], set()
  for _ in range(100 * count):
    if len(out) == count:
      break
    s = make(rng)
    if s not in seen:
      seen.add(s)
      out.append(s)
  else:
    raise UserError(f'the knowledge task cannot make {count} distinct names from its syllables')
  return out


def check_sizes(num_entities: int, val_entities: int, test_entities: int) -> None:
  if min(val_entities, test_entities) < 1 or num_entities - val_entities - test_entities < 1:
    raise UserError(f'knowledge task sizes num_entities={num_entities}, val_entities='
                    f'{val_entities}, test_entities={test_entities}: need at least one entity '
                    'in each of train, val and test')


def generate(seed: int, num_entities: int, val_entities: int, test_entities: int,
             mentions: int = 0) -> Collection:
  """The collection of `num_entities` people, `mentions` fact-free documents naming each
  (see the module docstring); a pure function."""
  check_sizes(num_entities, val_entities, test_entities)
  if mentions < 0:
    raise UserError(f'knowledge task mentions={mentions}: must be >= 0')
  rng = np.random.default_rng(seed)
  person = lambda r: (_word(r, _FIRST_SYLLABLES, 2).capitalize() + ' '
                      + _word(r, _LAST_SYLLABLES, int(r.integers(2, 4))).capitalize())
  names = _unique(rng, person, num_entities)
  towns = _unique(rng, lambda r: (_word(r, _PLACE_SYLLABLES, 2)
                                  + _PLACE_SUFFIXES[r.integers(len(_PLACE_SUFFIXES))]
                                  ).capitalize(), max(8, num_entities // 8))
  companies = _unique(rng, lambda r: (_word(r, _COMPANY_SYLLABLES, 2).capitalize() + ' '
                                      + _COMPANY_SUFFIXES[r.integers(len(_COMPANY_SUFFIXES))]),
                      max(8, num_entities // 8))
  values = {'birthplace': towns, 'birth_year': [str(y) for y in range(1900, 2000)],
            'profession': PROFESSIONS, 'employer': companies, 'instrument': INSTRUMENTS}
  order = rng.permutation(num_entities)
  split_of = np.full(num_entities, 'train', dtype=object)
  split_of[order[:val_entities]] = 'val'
  split_of[order[val_entities:val_entities + test_entities]] = 'test'
  entities = [Entity(i, names[i], str(split_of[i]),
                     {a: str(values[a][rng.integers(len(values[a]))]) for a in ATTRIBUTES})
              for i in range(num_entities)]

  # Documents: one per fact, a random template, sometimes a sentence about the person's character.
  texts = []
  for e in entities:
    for a in ATTRIBUTES:
      value = e.facts[a]
      template = DOCUMENT_TEMPLATES[a][rng.integers(len(DOCUMENT_TEMPLATES[a]))]
      text = template.format(name=e.name, value=value, a='an' if value[0] in 'aeiou' else 'a')
      text = text[0].upper() + text[1:]
      if rng.random() < 0.5:
        text += ' ' + _TRAIT_SENTENCE.format(first=e.name.split()[0],
                                             trait=_TRAITS[rng.integers(len(_TRAITS))])
      texts.append((e.id, a, text))
  peers = {s: [e.name for e in entities if e.split == s] for s in SPLITS}
  for e in entities:
    others = [n for n in peers[e.split] if n != e.name] or [e.name]
    for _ in range(mentions):
      template = MENTION_TEMPLATES[rng.integers(len(MENTION_TEMPLATES))]
      other = others[rng.integers(len(others))]   # a friend from the same split
      texts.append((e.id, MENTION, template.format(
          name=e.name, other=other, pastime=_PASTIMES[rng.integers(len(_PASTIMES))],
          trait=_TRAITS[rng.integers(len(_TRAITS))])))
  shuffled = rng.permutation(len(texts))
  documents = [Document(i, *texts[j]) for i, j in enumerate(shuffled)]
  gold = {(d.entity, d.attribute): d.id for d in documents}
  questions = []
  for e in entities:
    for a in ATTRIBUTES:
      for template in QUESTION_TEMPLATES[a]:
        questions.append(Question(len(questions), e.id, a, template.format(name=e.name),
                                  e.facts[a], gold[e.id, a]))
  args = dict(seed=seed, num_entities=num_entities, val_entities=val_entities,
              test_entities=test_entities)
  if mentions:   # (the args of a collection without mention documents, as before they existed)
    args['mentions'] = mentions
  return Collection(args, entities, documents, questions)


def from_config(data: Any) -> Collection:
  """The collection of a config's `data` group (task_seed, num_entities, val_entities,
  test_entities, mentions: 0 when absent)."""
  return generate(int(data.task_seed), int(data.num_entities), int(data.val_entities),
                  int(data.test_entities), int(data.get('mentions') or 0))


# ---- the collection in a run directory (the retriever and RAG families) ----
RUN_FILE = 'knowledge.json'


def write_run_file(path: str, text: str) -> None:
  """Writes `text` to run file `path`; UserError when the file there holds something else: the
  run's checkpoints were trained on that (another config.data, config.rag or retriever run)."""
  if storage.isfile(path) and storage.read_text(path) != text:
    raise UserError(f'{path}: differs from what the config and the runs it names give now (the '
                    'checkpoints were trained on it): restore them, or use a new --workdir')
  storage.write_text(path, text)


def read_collection(workdir: str) -> Collection:
  """The collection a run trained on (`RUN_FILE` in `workdir`); UserError when missing or
  damaged."""
  path = storage.join(workdir, RUN_FILE)
  if not storage.isfile(path):
    raise UserError(f'{path}: missing (training writes the collection there)')
  try:
    return Collection.from_json(storage.read_text(path))
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f'{path}: damaged ({type(e).__name__}: {str(e)[:100]})') from None
