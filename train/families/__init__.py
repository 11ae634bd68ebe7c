"""Registry of model families: `config.family` names one of these.

A family is imported only when a config asks for it, so one family's dependencies never slow
down or break another's runs.
"""

from __future__ import annotations

import importlib

from train.errors import UserError

# name -> "module:Class"
_FAMILIES = {
    'gpt': 'train.families.gpt:GPTFamily',
    'gpt_instruct': 'train.families.gpt_instruct:InstructGPTFamily',
    'distill_gpt': 'train.families.distill_gpt:DistillGPTFamily',
    'reward': 'train.families.reward:RewardFamily',
    'dpo': 'train.families.dpo:DPOFamily',
    'rlhf': 'train.families.rlhf:RLHFFamily',
    'diffusion': 'train.families.diffusion:DiffusionFamily',
    'text2image': 'train.families.text2image:TextToImageFamily',
    'classifier': 'train.families.classifier:ClassifierFamily',
    'vae': 'train.families.vae:VAEFamily',
    'gan': 'train.families.gan:GANFamily',
    'bert': 'train.families.bert:BERTFamily',
    'translate': 'train.families.translate:TranslateFamily',
    'retriever': 'train.families.retriever:RetrieverFamily',
    'rag_gpt': 'train.families.rag_gpt:RAGGPTFamily',
    'clip': 'train.families.clip:CLIPFamily',
}


def register(name: str, target: str) -> None:
  """Adds a family (e.g. from a test or an out-of-tree project): `target` is 'module:Class'."""
  _FAMILIES[name] = target


def get(name: str):
  if name not in _FAMILIES:
    raise UserError(f'config.family={name!r}: unknown family (known: {", ".join(sorted(_FAMILIES))})')
  module, _, cls = _FAMILIES[name].partition(':')
  return getattr(importlib.import_module(module), cls)
