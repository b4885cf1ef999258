"""Spilled pages -> the prepared dataset: the BPE, the train / val records and dataset.json.

The second pass of prepare.py (`merge`, also its `--merge` step after sharded runs: every part
in OUT/parts, converted with the same settings). It streams the spill
files twice (the BPE trains on the markup, then every page is encoded and written), so memory
stays bounded whatever the corpus size. Tokens are encoded in batches on all cores (the
tokenizer's own thread pool) and cut at `max_tokens`; a page's element labels are the types
whose open tag is among the tokens kept, so labels and target always describe the same markup.
A page goes to val when a hash of its markup falls in the val fraction: identical pages share a
side, and the duplicates are counted in the summary.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter

import msgpack
import numpy as np
import tqdm

from phase1_jax.data import bpe, patches, records, vocab

ENCODE_BATCH = 256
PARTS_DIR = 'parts'
STAGING_DIR = 'assembling.incomplete'   # merge writes here, then moves the files up


class PrepareError(ValueError):
  """The conversion cannot start or produced nothing; one line naming the folder or flag."""


def open_tags(element_types) -> list[str]:
  """The open-tag token (`<TAG `, one BPE id) each element type is written with."""
  return [bpe.ELEMENT_OPEN_TOKENS[vocab.ELEMENT_TYPES.index(t)] for t in element_types]


def read_spill(paths: list[str]):
  """Yields the page entries of the spill files, in order."""
  for path in paths:
    with open(path, 'rb') as f:
      yield from msgpack.Unpacker(f, raw=False, max_buffer_size=1 << 30)


def markup_hash(markup: str) -> str:
  return hashlib.sha1(markup.encode('utf-8', 'surrogatepass')).hexdigest()


def split_of(digest: str, val_fraction: float) -> str:
  return 'val' if int(digest[:8], 16) % 10_000 < val_fraction * 10_000 else 'train'


def _input_arrays(entry: dict) -> dict:
  if 'patches' in entry:
    n = entry['num_patches']
    pixels = {'patches': np.frombuffer(entry['patches'], np.uint8).reshape(n, -1),
              'patch_positions': np.frombuffer(entry['positions'], np.int16).reshape(n, 2)}
    if 'patch_labels' in entry:
      pixels['patch_labels'] = np.frombuffer(entry['patch_labels'], np.int8).reshape(n, 2)
    return pixels
  return {'features': np.frombuffer(entry['features'], np.float16).reshape(
      entry['num_patches'], -1)}


def _patch_words(tok, entries) -> list:
  """Each entry's patch_words pairs (patches.word_pairs: its visible text blocks tokenized by
  the dataset's BPE, on the patches under each), None for one without text blocks (features,
  a spill from before them)."""
  texts = [text for e in entries for text, _ in e.get('text_blocks', ())]
  ids = iter([enc.ids for enc in tok.encode_batch(texts)] if texts else [])
  return [None if 'text_blocks' not in e else patches.word_pairs(
      [p for _, p in e['text_blocks']], [next(ids) for _ in e['text_blocks']]) for e in entries]


def _page_record(entry, enc, max_tokens: int, open_tag_ids: np.ndarray, words=None) -> dict:
  ids = np.array(enc.ids[:max_tokens], np.int32)
  runs = np.array(entry['runs'], np.int64).reshape(-1, 2)
  char_classes = np.repeat(runs[:, 1], runs[:, 0]).astype(np.int8)
  starts = np.array([s for s, _ in enc.offsets[:max_tokens]], np.int64)
  semantic = char_classes[np.minimum(starts, len(char_classes) - 1)]
  element_labels = np.isin(open_tag_ids, ids).astype(np.uint8)
  words = {} if words is None else {'patch_words': words}
  return {**_input_arrays(entry), **words, 'tokens': ids, 'semantic_labels': semantic,
          'element_labels': element_labels, 'source_id': entry['id']}


def _choose_splits(spill_paths, val_fraction):
  """{page id: split} by markup hash (at least one val page when there are two distinct ones),
  and the duplicate pages as [(page, the first page with that markup)]."""
  first, digests, duplicates = {}, {}, []
  for entry in read_spill(spill_paths):
    digest = digests[entry['id']] = entry['hash']
    if digest in first:
      duplicates.append((entry['id'], first[digest]))
    else:
      first[digest] = entry['id']
  by_hash = {d: split_of(d, val_fraction) for d in first}
  if val_fraction > 0 and len(first) > 1 and 'val' not in by_hash.values():
    by_hash[max(first)] = 'val'
  if 'train' not in by_hash.values():
    by_hash[min(first)] = 'train'
  return {page: by_hash[d] for page, d in digests.items()}, duplicates


def assemble(out: str, spill_paths: list[str], *, scheme_lists: dict, vocab_size: int,
             val_fraction: float, max_tokens: int, records_per_shard: int, input_info: dict,
             summary: dict, progress: bool) -> dict:
  """Writes the tokenizer, the records and dataset.json into `out`; returns the metadata."""
  splits, duplicates = _choose_splits(spill_paths, val_fraction)
  tok = bpe.train((e['markup'] for e in read_spill(spill_paths)), vocab_size)
  tok.save(os.path.join(out, records.TOKENIZER_FILE))
  open_tag_ids = np.array([tok.token_to_id(t) for t in open_tags(scheme_lists['element_types'])])
  writers = {s: records.ShardWriter(out, s, records_per_shard) for s in ('train', 'val')}
  stats = {'lengths': [], 'stored': [], 'classes': Counter(), 'types': Counter(),
           'without_patch_labels': 0, 'without_patch_words': 0, 'max_patch_words': 0}
  bar = tqdm.tqdm(total=len(splits), desc='Writing', disable=not progress, unit='page')
  batch = []
  for entry in (*read_spill(spill_paths), None):
    if entry is not None:
      batch.append(entry)
    if batch and (entry is None or len(batch) == ENCODE_BATCH):
      encodings = tok.encode_batch([e['markup'] for e in batch])
      for e, enc, words in zip(batch, encodings, _patch_words(tok, batch), strict=True):
        page = _page_record(e, enc, max_tokens, open_tag_ids, words)
        writers[splits[e['id']]].write(page)
        stats['lengths'].append(len(enc.ids))
        stats['stored'].append(len(page['tokens']))
        stats['types'].update(np.flatnonzero(page['element_labels']).tolist())
        stats['classes'].update(page['semantic_labels'].tolist())
        stats['without_patch_labels'] += 'patch_labels' not in page
        stats['without_patch_words'] += 'patch_words' not in page
        stats['max_patch_words'] = max(stats['max_patch_words'], len(page.get('patch_words', ())))
      bar.update(len(batch))
      batch = []
  bar.close()
  for w in writers.values():
    w.close()
  summary = {**summary, 'duplicate_pages': len(duplicates),
             'duplicates': [{'path': a, 'same_as': b} for a, b in duplicates[:50]]}
  metadata = _metadata(tok, writers, stats, scheme_lists, open_tag_ids, input_info, summary,
                       max_tokens)
  records.write_metadata(out, metadata)
  return metadata


def _metadata(tok, writers, stats, lists, open_tag_ids, input_info, summary, max_tokens) -> dict:
  lengths, stored = np.array(stats['lengths']), np.array(stats['stored'])
  classes, types = stats['classes'], stats['types']
  names_c, names_t = lists['semantic_classes'], lists['element_types']
  kind = input_info['input']
  # An optional field is listed (and dataset.json says `name: true`) when every record has it.
  optional = {name: dtype for name, dtype in records.OPTIONAL_FIELDS[kind].items()
              if not stats[f'without_{name}']}
  array_fields = records.array_fields(kind) | optional
  return {
      'format': records.FORMAT, 'version': records.VERSION,
      'record_encoding': 'msgpack map per ArrayRecord record; arrays as {dtype, shape, data}',
      'fields': {name: {'dtype': dtype, 'shape': records.FIELD_SHAPES[name]}
                 for name, dtype in array_fields.items()} | {
                     'source_id': {'dtype': 'str', 'shape': []}},
      **input_info,
      'patch_labels': 'patch_labels' in optional,   # loss.patch_weight can train
      'patch_words': 'patch_words' in optional,     # loss.patch_words_weight can train
      # The most pairs any record holds: the length batches pad patch_words to.
      **({'max_patch_words': stats['max_patch_words']} if 'patch_words' in optional else {}),
      'tokenizer': records.TOKENIZER_FILE, 'vocab_size': tok.get_vocab_size(),
      'max_tokens': max_tokens,
      'special_ids': {'pad': vocab.PAD_ID, 'bos': vocab.BOS_ID, 'eos': vocab.EOS_ID,
                      'unk': vocab.UNK_ID},
      'element_open_tags': open_tags(names_t),
      'element_open_tag_ids': [int(i) for i in open_tag_ids],
      'semantic_classes': list(names_c), 'element_types': list(names_t),
      'splits': {s: {'num_records': w.count, 'shards': w.shards} for s, w in writers.items()},
      'summary': {
          **summary, 'pages_written': int(len(lengths)), 'tokens': int(lengths.sum()),
          'tokens_stored': int(stored.sum()),
          'pages_cut_at_max_tokens': int((lengths > max_tokens).sum()),
          'tokens_per_page': {'mean': float(lengths.mean()), 'median': float(np.median(lengths)),
                              'p95': float(np.percentile(lengths, 95)),
                              'max': int(lengths.max())},
          'semantic_class_tokens': {
              **{names_c[c]: n for c, n in sorted(classes.items()) if c >= 0},
              'outside_sections': classes.get(-1, 0)},
          'element_type_pages': {names_t[e]: n for e, n in sorted(types.items())}},
  }


def summary_text(metadata: dict) -> str:
  s = metadata['summary']
  top = lambda h: ', '.join(f'{k} {v}' for k, v in sorted(h.items(), key=lambda kv: -kv[1])[:8])
  n = {split: v['num_records'] for split, v in metadata['splits'].items()}
  lines = [
      f'Pages: {s["pages_found"]} found, {s["pages_written"]} written (train {n["train"]}, '
      f'val {n["val"]}), {s["pages_skipped"]} skipped, {s["duplicate_pages"]} duplicates '
      f'(kept, each on its original\'s side)',
      f'Tokens: {s["tokens"]:,} (per page: mean {s["tokens_per_page"]["mean"]:.0f}, '
      f'p95 {s["tokens_per_page"]["p95"]:.0f}, max {s["tokens_per_page"]["max"]}); '
      f'{s["pages_cut_at_max_tokens"]} pages stored cut at {metadata["max_tokens"]}; '
      f'vocab {metadata["vocab_size"]}',
      f'Section classes (tokens): {top(s["semantic_class_tokens"])}',
      f'Element types (pages): {top(s["element_type_pages"])}']
  if 'pages_per_second' in s:
    lines.append(f'Converted {s["pages_per_second"]:.2f} pages/s; {s["requests_blocked"]} '
                 f'requests blocked (outside the folder or the network)')
  lines += [f'Skipped {x["path"]}: {x["reason"]}' for x in s['skipped'][:20]]
  if s['pages_skipped'] > 20:
    lines.append(f'... and {s["pages_skipped"] - 20} more (dataset.json summary.skipped)')
  return '\n'.join(lines)


def _read_parts(out: str) -> tuple[list[dict], dict]:
  parts_dir = os.path.join(out, PARTS_DIR)
  names = sorted(n for n in os.listdir(parts_dir) if n.startswith('part-') and
                 n.endswith('.json')) if os.path.isdir(parts_dir) else []
  if not names:
    raise PrepareError(f'--out {out}: no converted parts in {parts_dir} (run prepare first)')
  parts = [json.load(open(os.path.join(parts_dir, n))) for n in names]
  count = parts[0]['count']
  missing = sorted(set(range(count)) - {p['index'] for p in parts})
  if missing:
    raise PrepareError(f'--out {out}: parts {missing} of {count} are not written yet')
  infos = [json.load(open(os.path.join(parts_dir, f'settings-{p["index"]:05d}.json')))
           for p in parts]
  if any(i != infos[0] for i in infos):
    raise PrepareError(f'--out {out}: the parts were converted with different settings')
  return parts, infos[0]


def merge(out: str, *, vocab_size: int = 8000, val_fraction: float = 0.1, max_tokens: int = 2048,
          records_per_shard: int = 1000, progress: bool = True, html_dir: str = '',
          quiet: bool = False) -> dict:
  """Pass 2 over every part in out/parts: the tokenizer, records and dataset.json."""
  parts, info = _read_parts(out)
  skipped = [s for p in parts for s in p['skipped']]
  found = sum(p['pages_found'] for p in parts)
  if not sum(p['pages_kept'] for p in parts):
    first = f' (first: {skipped[0]["path"]}: {skipped[0]["reason"]})' if skipped else ''
    raise PrepareError(f'--html_dir {html_dir or out}: none of {found} pages could be '
                       f'converted{first}')
  dims = {p['feature_dim'] for p in parts} - {None}
  if len(dims) > 1:
    raise PrepareError(f'--out {out}: feature widths differ between parts ({sorted(dims)})')
  input_info = {k: v for k, v in info.items() if k not in ('semantic_classes', 'element_types')}
  input_info.update(feature_dim=(2 + 3 * info['patch_size'] ** 2)
                    if info['input'] == 'pixels' else dims.pop())
  seconds = max(p['seconds'] for p in parts)
  summary = {'pages_found': found, 'pages_skipped': len(skipped), 'skipped': skipped,
             'requests_blocked': sum(p['requests_blocked'] for p in parts),
             # Parts run side by side: their rates add up.
             'pages_per_second': sum(p['pages_found'] / max(p['seconds'], 1e-9) for p in parts),
             'convert_seconds': seconds}
  spills = [os.path.join(out, PARTS_DIR, f'part-{p["index"]:05d}-of-{p["count"]:05d}.spill')
            for p in sorted(parts, key=lambda p: p['index'])]
  # Written aside and moved in at the end, dataset.json last: a failed merge leaves the parts
  # as they were and no half-written dataset in `out`.
  staging = os.path.join(out, STAGING_DIR)
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  try:
    metadata = assemble(
        staging, spills, scheme_lists={k: info[k] for k in ('semantic_classes', 'element_types')},
        vocab_size=vocab_size, val_fraction=val_fraction, max_tokens=max_tokens,
        records_per_shard=records_per_shard, input_info=input_info, summary=summary,
        progress=progress)
    if not metadata['splits']['train']['num_records']:
      raise PrepareError(f'--html_dir {html_dir or out}: no page left for the train split')
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  for name in (records.TOKENIZER_FILE, 'train', 'val', records.METADATA_FILE):
    os.replace(os.path.join(staging, name), os.path.join(out, name))
  os.rmdir(staging)
  shutil.rmtree(os.path.join(out, PARTS_DIR))
  if not quiet:
    print(summary_text(metadata))
  return metadata
