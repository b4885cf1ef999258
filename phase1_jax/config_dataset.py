"""Sizes a config from a prepared directory's dataset.json (called by the prepared-data configs)."""
from __future__ import annotations

import json
import os

import ml_collections


def fit_to_dataset(config: ml_collections.ConfigDict, path: str) -> ml_collections.ConfigDict:
  """Points `config` at the prepared directory `path` and sizes it from its dataset.json: the
  vocabulary (rounded up to a multiple of 128), the head sizes (the dataset's section classes and
  element types), the input width and, for a pixel config on a pixel dataset, the patch layout.
  A missing or unreadable directory, or a dataset of the other input kind, is left to validate(),
  which names it in one line."""
  config.data.name, config.data.path = 'files', path
  metadata = os.path.join(path, 'dataset.json')
  if not (path and os.path.isfile(metadata)):
    return config
  try:
    with open(metadata) as f:
      meta = json.load(f)
    config.model.vocab_size = -(-meta['vocab_size'] // 128) * 128
    config.model.num_semantic_classes = len(meta['semantic_classes'])
    config.model.num_element_types = len(meta['element_types'])
    pixel_config = config.data.patch_size > 0
    if (meta.get('input') == 'pixels') == pixel_config:   # else validate() names the mismatch
      config.data.feature_dim = meta['feature_dim']
      if pixel_config:
        config.data.patch_size = meta['patch_size']
        config.data.max_patches = meta['max_patches']
  except (OSError, ValueError, LookupError, TypeError, AttributeError, ArithmeticError):
    pass    # an unreadable or damaged dataset.json: validate() names it
  return config
