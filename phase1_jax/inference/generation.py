"""generate_pages(run, workdir): a trained checkpoint -> one JSON object per page (JSON Lines).

Each record (the format `schemas/generation.schema.json` defines): the decoded markup and its
token ids, the sections (runs of tokens with one predicted semantic class, by name), the element
types whose probability reaches `eval.element_threshold`, the score, where the page's features
came from, and the settings that produced it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING

import jax
import numpy as np

from phase1_jax.data import pipeline, vocab
from phase1_jax.inference import decoding, evaluation, mbr
from phase1_jax.training import parallel, reporting

if TYPE_CHECKING:   # specs imports evaluation, which this module imports
  from phase1_jax.specs import RunSpec

SCHEMA_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'schemas',
                           'generation.schema.json')


class InputError(ValueError):
  """A user-supplied input (a features file, a sample count) is unusable; one line naming it."""


class FeatureFile:
  """Pages from a user's .npy of features, [num_pages, patches, feature_dim] or one page
  [patches, feature_dim]; every patch is valid."""

  def __init__(self, path: str, feature_dim: int):
    try:
      features = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise InputError(f'{path}: not a readable .npy array ({e})') from None
    if features.ndim == 2:
      features = features[None]
    if features.ndim != 3 or features.shape[0] == 0 or features.shape[1] == 0:
      raise InputError(f'{path}: features must be [pages, patches, {feature_dim}] or '
                       f'[patches, {feature_dim}], got shape {features.shape}')
    if features.shape[-1] != feature_dim:
      raise InputError(f'{path}: feature_dim {features.shape[-1]} != data.feature_dim '
                       f'{feature_dim} of the trained model')
    if not np.issubdtype(features.dtype, np.floating):
      raise InputError(f'{path}: features must be floats, got {features.dtype}')
    if not np.isfinite(features).all():
      page = int(np.argwhere(~np.isfinite(features))[0][0])
      raise InputError(f'{path}: page {page} has non-finite features (NaN or inf)')
    self.features = features.astype(np.float32)
    self.name = os.path.basename(path)

  def __len__(self):
    return len(self.features)

  def __getitem__(self, i):
    return {'features': self.features[i], 'feature_mask': np.ones(self.features.shape[1], bool)}


def _sections(ids: list[int], semantic: np.ndarray, decode) -> list[dict]:
  """Maximal runs of tokens with the same predicted semantic class."""
  sections, start = [], 0
  for i in range(1, len(ids) + 1):
    if i == len(ids) or semantic[i] != semantic[start]:
      sections.append({'semantic_class': vocab.SEMANTIC_CLASSES[int(semantic[start])],
                       'start': start, 'end': i, 'markup': decode(ids[start:i])})
      start = i
  return sections


def page_records(out: dict, sources: list[str], *, settings: dict, threshold: float,
                 decode) -> list[dict]:
  """JSON records of a decoded batch (numpy arrays from decoding.generate)."""
  records = []
  for row, source in enumerate(sources):
    tokens_T = out['tokens'][row]
    finished = bool((tokens_T == vocab.EOS_ID).any())
    ids = [int(t) for t in tokens_T[:int(np.argmax(tokens_T == vocab.EOS_ID)) if finished
                                    else len(tokens_T)]]
    elements = [{'type': vocab.ELEMENT_TYPES[e], 'probability': float(p)}
                for e, p in enumerate(out['element_probs'][row]) if p >= threshold]
    records.append({
        'source': source,
        'markup': decode(ids),
        'token_ids': ids,
        'finished': finished,
        'score': float(out['score'][row]),
        'sections': _sections(ids, out['semantic'][row], decode),
        'elements': sorted(elements, key=lambda e: -e['probability']),
        'settings': settings,
    })
  return records


def generate_pages(run: RunSpec, workdir: str, *, num_samples: int | None,
                   output: str | None = None, features_path: str | None = None,
                   which: str = 'best') -> tuple[str, int]:
  """Decodes `num_samples` pages (all if None) of the validation split, or of `features_path`,
  with the checkpoint `which` of `workdir` and `run.eval.decode`; writes JSON Lines to `output`
  (default `<workdir>/generations.jsonl`). Returns (output path, pages written)."""
  if num_samples is not None and num_samples < 1:
    raise InputError(f'--num_samples={num_samples}: must be >= 1 (leave it out for all pages)')
  output = output or os.path.join(workdir, 'generations.jsonl')
  folder = os.path.dirname(output) or '.'
  if not os.path.isdir(folder):   # before the checkpoint loads and the decoder compiles
    raise InputError(f'{output}: cannot write (File exists: {folder} is not a folder)'
                     if os.path.exists(folder) else
                     f'{output}: cannot write (No such folder: {folder})')
  if features_path is not None:
    source = FeatureFile(features_path, run.model.feature_dim)
    source_name = lambda i: f'{source.name}:{i}'
  else:
    source = pipeline.make_source(run.data, 'val')
    source_name = lambda i: f'val:{i}'
  par = parallel.DataParallel(run.mesh)   # the run's layout: params sharded as in training
  graphdef, params, step, _ = evaluation.load_trained(run, workdir, which=which, par=par)
  e = run.eval
  settings = e.decode
  ids = decoding.TokenIds(vocab.BOS_ID, vocab.EOS_ID, vocab.PAD_ID)
  decode = pipeline.markup_decoder(run.data, run.model.vocab_size)
  generate = mbr.generator(   # par.generate places the host batches itself
      lambda s: par.generate(graphdef=graphdef, settings=s, ids=ids), settings,
      to_markup=decode, eos_id=ids.eos)
  record_settings = {
      **dataclasses.asdict(settings),
      'seed': e.decode_seed, 'element_threshold': e.element_threshold,
      'checkpoint_step': step, 'attention_kind': run.model.attention.kind,
  }
  rng = jax.random.key(e.decode_seed)
  lines, done = [], 0
  for batch, real in pipeline.eval_batches(source, batch_size=e.batch_size,
                                           limit=num_samples):
    # Batch keys are fold_in(seed key, first page index): the same seed, batch size and pages
    # give the same samples.
    out = jax.device_get(generate(params, batch['features'], batch['feature_mask'],
                                  jax.random.fold_in(rng, done)))
    out = {k: np.asarray(v)[:real] for k, v in out.items()}
    for record in page_records(out, [source_name(done + i) for i in range(real)],
                               settings=record_settings,
                               threshold=e.element_threshold, decode=decode):
      lines.append(json.dumps(record))
    done += real
  reporting.atomic_write_text(output, ''.join(line + '\n' for line in lines))
  return output, done
