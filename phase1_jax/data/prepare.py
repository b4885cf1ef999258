"""HTML folder -> prepared page dataset (records.py's format).

    python -m phase1_jax.data.prepare --html_dir pages/ --out data/pages [--vocab_size 8000]

Two streaming passes, so memory stays bounded whatever the corpus size: (1) parse every *.html /
*.htm page (parallel workers) into normalised markup, labels and layout, spilled to a JSON Lines
file in OUT; (2) train the byte-level BPE on the spilled markup, then encode, render features and
write the train / val shards. A page goes to val when crc32(its relative path) falls in the
--val_fraction (stable when pages are added; at least one val page when there are two or more).
A page that cannot be read or parsed is skipped and reported, never fatal.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import zlib
from collections import Counter

import numpy as np
import tqdm
from absl import app, flags

from phase1_jax.data import bpe, html_pages, records, synthetic, vocab

HTML_SUFFIXES = ('.html', '.htm')
SPILL_FILE = '.parsed.jsonl'


class PrepareError(ValueError):
  """The conversion cannot start or produced nothing; one line naming the folder or flag."""


def find_pages(html_dir: str) -> list[str]:
  """Relative paths of the HTML pages under html_dir, sorted."""
  if not os.path.isdir(html_dir):
    raise PrepareError(f'--html_dir {html_dir}: not a directory')
  found = []
  for root, _, files in os.walk(html_dir):
    found += [os.path.relpath(os.path.join(root, f), html_dir) for f in files
              if f.lower().endswith(HTML_SUFFIXES)]
  if not found:
    raise PrepareError(f'--html_dir {html_dir}: no {"/".join(HTML_SUFFIXES)} files in it')
  return sorted(found)


def _parse_one(job: tuple[str, str]) -> dict:
  """Worker: one page -> its spill entry, or {'id', 'skipped': reason}."""
  html_dir, rel = job
  try:
    with open(os.path.join(html_dir, rel), 'rb') as f:
      page = html_pages.parse_page(f.read())
  except OSError as e:
    return {'id': rel, 'skipped': f'unreadable ({e.strerror or e})'}
  except html_pages.PageError as e:
    return {'id': rel, 'skipped': str(e)}
  except Exception as e:  # noqa: BLE001 - a parser bug on one odd page must not end the run
    return {'id': rel, 'skipped': f'parse failed ({type(e).__name__}: {e})'}
  classes = page.char_classes_N
  cuts = np.flatnonzero(np.diff(classes)) + 1
  starts = np.concatenate([[0], cuts])
  runs = [[int(n), int(classes[s])] for s, n in zip(starts, np.diff([*starts, len(classes)]),
                                                      strict=True)]
  return {'id': rel, 'markup': page.markup, 'runs': runs, 'types': page.element_types,
          'layout': page.layout}


def _split_of(rel: str, val_fraction: float) -> str:
  return 'val' if zlib.crc32(rel.encode()) % 10_000 < val_fraction * 10_000 else 'train'


def _features(entry, layout_spec: synthetic.PageSpec, world, features_dir, seed):
  """float16 [P, F] features of a page: its user .npy, else its rendered layout."""
  if features_dir is not None:
    path = os.path.join(features_dir, os.path.splitext(entry['id'])[0] + '.npy')
    try:
      a = np.load(path)
    except (OSError, ValueError) as e:
      raise html_pages.PageError(f'features {path} unreadable ({e})') from None
    if a.ndim != 2 or not a.size:
      raise html_pages.PageError(f'features {path}: need a 2-D [patches, dim] array, got {a.shape}')
    a = a.astype(np.float16)
    if not np.isfinite(a).all():
      raise html_pages.PageError(f'features {path}: not finite in float16 (|x| <= 65504)')
    return a
  layout = [(c, [tuple(e) for e in els]) for c, els in entry['layout']][:layout_spec.grid_rows]
  rng = np.random.default_rng([seed, zlib.crc32(entry['id'].encode())])
  return synthetic.layout_features(
      layout or [(None, [])], world, grid_rows=layout_spec.grid_rows,
      grid_cols=layout_spec.grid_cols, text_visibility=layout_spec.text_visibility,
      feature_noise=layout_spec.feature_noise, rng=rng).astype(np.float16)


def prepare(html_dir: str, out: str, *, vocab_size: int = 8000, val_fraction: float = 0.1,
            features_dir: str | None = None, grid_rows: int = 16, grid_cols: int = 4,
            feature_dim: int = 64, feature_noise: float = 0.5, text_visibility: float = 0.8,
            workers: int = 0, records_per_shard: int = 1000, seed: int = 0,
            progress: bool = True) -> dict:
  """Converts html_dir into a prepared dataset in `out` (new or empty). Returns dataset.json."""
  if not 0 <= val_fraction < 1:
    raise PrepareError(f'--val_fraction {val_fraction}: must be in [0, 1)')
  if not bpe.MIN_VOCAB_SIZE <= vocab_size <= bpe.MAX_VOCAB_SIZE:
    raise PrepareError(f'--vocab_size {vocab_size}: must be in [{bpe.MIN_VOCAB_SIZE}, '
                       f'{bpe.MAX_VOCAB_SIZE}]')
  if features_dir is not None and not os.path.isdir(features_dir):
    raise PrepareError(f'--features_dir {features_dir}: not a directory')
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise PrepareError(f'--out {out}: exists and is not empty (choose a new directory)')
  rels = find_pages(html_dir)
  os.makedirs(out, exist_ok=True)
  spill_path = os.path.join(out, SPILL_FILE)
  skipped, kept = [], []
  # Auto: a spawned worker costs seconds to start (it imports the package), about as long as
  # parsing a few hundred pages, so small corpora are parsed in this process.
  workers = workers or min(4, os.cpu_count() or 1, max(1, len(rels) // 200))

  # Pass 1: parse (parallel), spill to disk.
  jobs = [(html_dir, rel) for rel in rels]
  bar = dict(total=len(jobs), disable=not progress, unit='page')
  with open(spill_path, 'w') as spill:
    if workers > 1:
      ctx = multiprocessing.get_context('spawn')   # fork is unsafe once jax has started threads
      with ctx.Pool(workers) as pool:
        results = pool.imap(_parse_one, jobs, chunksize=16)
        for r in tqdm.tqdm(results, desc='Parsing', **bar):
          _keep(r, spill, kept, skipped)
    else:
      for r in tqdm.tqdm(map(_parse_one, jobs), desc='Parsing', **bar):
        _keep(r, spill, kept, skipped)
  if not kept:
    os.remove(spill_path)
    raise PrepareError(f'--html_dir {html_dir}: none of {len(rels)} pages could be converted '
                       f'(first: {skipped[0]["path"]}: {skipped[0]["reason"]})')
  splits = {rel: _split_of(rel, val_fraction) for rel in kept}
  if val_fraction > 0 and len(kept) > 1 and 'val' not in splits.values():
    splits[kept[-1]] = 'val'
  if 'train' not in splits.values():
    splits[kept[0]] = 'train'

  # Pass 2: tokenizer on the spilled markup, then records.
  def markups():
    with open(spill_path) as f:
      for line in f:
        yield json.loads(line)['markup']
  tok = bpe.train(markups(), vocab_size)
  tok.save(os.path.join(out, records.TOKENIZER_FILE))
  layout_spec = synthetic.PageSpec(grid_rows=grid_rows, grid_cols=grid_cols,
                                   feature_dim=feature_dim, feature_noise=feature_noise,
                                   text_visibility=text_visibility, max_sections=grid_rows)
  world = synthetic.World(layout_spec)
  writers = {s: records.ShardWriter(out, s, records_per_shard) for s in ('train', 'val')}
  stats = {'lengths': [], 'classes': Counter(), 'types': Counter(), 'dim': None}
  with open(spill_path) as f:
    for line in tqdm.tqdm(f, desc='Writing', total=len(kept), disable=not progress, unit='page'):
      entry = json.loads(line)
      try:
        page = _record(entry, tok, layout_spec, world, features_dir, seed, stats)
      except html_pages.PageError as e:
        skipped.append({'path': entry['id'], 'reason': str(e)})
        continue
      writers[splits[entry['id']]].write(page)
  for w in writers.values():
    w.close()
  os.remove(spill_path)
  if not writers['train'].count:
    raise PrepareError(f'--html_dir {html_dir}: no page left for the train split '
                       f'({len(skipped)} skipped)')

  metadata = _metadata(tok, writers, stats, skipped, len(rels), features_dir,
                       (grid_rows, grid_cols))
  records.write_metadata(out, metadata)
  print(summary_text(metadata))
  return metadata


def _keep(result, spill, kept, skipped):
  if 'skipped' in result:
    skipped.append({'path': result['id'], 'reason': result['skipped']})
  else:
    spill.write(json.dumps(result) + '\n')
    kept.append(result['id'])


def _record(entry, tok, layout_spec, world, features_dir, seed, stats) -> dict:
  enc = tok.encode(entry['markup'])
  runs = np.array(entry['runs'], np.int64).reshape(-1, 2)
  char_classes = np.repeat(runs[:, 1], runs[:, 0]).astype(np.int8)
  starts = np.array([s for s, _ in enc.offsets], np.int64)
  semantic = char_classes[np.minimum(starts, len(char_classes) - 1)]
  features = _features(entry, layout_spec, world, features_dir, seed)
  if stats['dim'] is None:
    stats['dim'] = features.shape[-1]
  elif features.shape[-1] != stats['dim']:
    raise html_pages.PageError(f'features of width {features.shape[-1]}, the first page had '
                               f'{stats["dim"]}')
  element_labels = np.zeros(len(vocab.ELEMENT_TYPES), np.uint8)
  element_labels[entry['types']] = 1
  stats['lengths'].append(len(enc.ids))
  stats['types'].update(entry['types'])
  stats['classes'].update(semantic.tolist())
  stats['max_patches'] = max(stats.get('max_patches', 0), len(features))
  return {'features': features, 'tokens': np.array(enc.ids, np.int32),
          'semantic_labels': semantic, 'element_labels': element_labels,
          'source_id': entry['id']}


def _metadata(tok, writers, stats, skipped, found, features_dir, grid) -> dict:
  lengths = np.array(stats['lengths'])
  classes = stats['classes']
  return {
      'format': records.FORMAT, 'version': records.VERSION,
      'record_encoding': 'msgpack map per ArrayRecord record; arrays as {dtype, shape, data}',
      'fields': {name: {'dtype': dtype, 'shape': records.FIELD_SHAPES[name]}
                 for name, dtype in records.ARRAY_FIELDS.items()} | {
                     'source_id': {'dtype': 'str', 'shape': []}},
      'feature_dim': int(stats['dim']), 'max_patches': int(stats['max_patches']),
      'features_from': 'npy' if features_dir else 'layout',
      'grid_rows': grid[0], 'grid_cols': grid[1],
      'tokenizer': records.TOKENIZER_FILE, 'vocab_size': tok.get_vocab_size(),
      'special_ids': {'pad': vocab.PAD_ID, 'bos': vocab.BOS_ID, 'eos': vocab.EOS_ID,
                      'unk': vocab.UNK_ID},
      'element_open_tags': list(bpe.ELEMENT_OPEN_TOKENS),
      'element_open_tag_ids': bpe.element_open_tag_ids(tok),
      'semantic_classes': list(vocab.SEMANTIC_CLASSES),
      'element_types': list(vocab.ELEMENT_TYPES),
      'splits': {s: {'num_records': w.count, 'shards': w.shards} for s, w in writers.items()},
      'summary': {
          'pages_found': found, 'pages_written': int(len(lengths)),
          'pages_skipped': len(skipped), 'skipped': skipped,
          'tokens': int(lengths.sum()),
          'tokens_per_page': {'mean': float(lengths.mean()), 'median': float(np.median(lengths)),
                              'p95': float(np.percentile(lengths, 95)),
                              'max': int(lengths.max())},
          'semantic_class_tokens': {
              **{vocab.SEMANTIC_CLASSES[c]: n for c, n in sorted(classes.items()) if c >= 0},
              'outside_sections': classes.get(-1, 0)},
          'element_type_pages': {vocab.ELEMENT_TYPES[e]: n for e, n in
                                 sorted(stats['types'].items())}},
  }


def summary_text(metadata: dict) -> str:
  s = metadata['summary']
  top = lambda h: ', '.join(f'{k} {v}' for k, v in sorted(h.items(), key=lambda kv: -kv[1])[:8])
  n = {split: v['num_records'] for split, v in metadata['splits'].items()}
  lines = [
      f'Pages: {s["pages_found"]} found, {s["pages_written"]} written (train {n["train"]}, '
      f'val {n["val"]}), {s["pages_skipped"]} skipped',
      f'Tokens: {s["tokens"]:,} (per page: mean {s["tokens_per_page"]["mean"]:.0f}, '
      f'p95 {s["tokens_per_page"]["p95"]:.0f}, max {s["tokens_per_page"]["max"]}); '
      f'vocab {metadata["vocab_size"]}',
      f'Section classes (tokens): {top(s["semantic_class_tokens"])}',
      f'Element types (pages): {top(s["element_type_pages"])}']
  lines += [f'Skipped {x["path"]}: {x["reason"]}' for x in s['skipped'][:20]]
  if s['pages_skipped'] > 20:
    lines.append(f'... and {s["pages_skipped"] - 20} more (dataset.json summary.skipped)')
  return '\n'.join(lines)


_HTML_DIR = flags.DEFINE_string('html_dir', None, 'Folder tree of .html/.htm pages.')
_OUT = flags.DEFINE_string('out', None, 'New (or empty) output directory.')
_VOCAB = flags.DEFINE_integer('vocab_size', 8000, 'BPE vocabulary size (300..50000).')
_VAL = flags.DEFINE_float('val_fraction', 0.1, 'Share of pages in the val split.')
_FEATURES = flags.DEFINE_string('features_dir', None,
                                'Optional <page path without suffix>.npy features [P, F].')
_WORKERS = flags.DEFINE_integer('workers', 0, 'Parser processes (0: min(4, CPUs, pages / 200)).')
_GRID = flags.DEFINE_list('grid', ['16', '4', '64'], 'Rendered features: rows,cols,feature_dim.')
_SHARD = flags.DEFINE_integer('records_per_shard', 1000, 'Records per ArrayRecord shard.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the rendered features\' noise.')


def main(argv):
  del argv
  rows, cols, dim = map(int, _GRID.value)
  try:
    prepare(_HTML_DIR.value, _OUT.value, vocab_size=_VOCAB.value, val_fraction=_VAL.value,
            features_dir=_FEATURES.value, grid_rows=rows, grid_cols=cols, feature_dim=dim,
            workers=_WORKERS.value, records_per_shard=_SHARD.value, seed=_SEED.value)
  except PrepareError as e:
    sys.exit(f'prepare: {e}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['html_dir', 'out'])
  app.run(main)
