"""Pass 1 of prepare.py: each page to its spill entry, and the entries into a part file.

An entry is a page's normalised markup, its label runs and its input (with --render, the
screenshot's patches, patch labels and visible text blocks with the patches under each; else the
user's features), or {'id', 'skipped': reason}. The work runs in worker processes (render_pool's,
one browser each, or a spawn pool parsing pages); only entries cross to the main process, which
appends them to the part's msgpack spill file for assemble.py (pass 2). A part's files appear
atomically, its summary (part-*.json) last.
"""
from __future__ import annotations

import functools
import json
import multiprocessing
import os
import time

import msgpack
import numpy as np
import tqdm

from phase1_jax.data import assemble, html_pages, patches, render_pool
from phase1_jax.data.assemble import PrepareError


def _entry(rel: str, page: html_pages.ParsedPage, inputs: dict) -> dict:
  classes = page.char_classes_N
  starts = np.concatenate([[0], np.flatnonzero(np.diff(classes)) + 1])
  runs = [[int(n), int(classes[s])] for s, n in zip(starts, np.diff([*starts, len(classes)]),
                                                      strict=True)]
  return {'id': rel, 'markup': page.markup, 'runs': runs, 'truncated': page.truncated,
          'hash': assemble.markup_hash(page.markup), **inputs}


def _features(features_dir: str, rel: str) -> dict:
  path = os.path.join(features_dir, os.path.splitext(rel)[0] + '.npy')
  try:
    a = np.load(path)
  except (OSError, ValueError) as e:
    raise html_pages.PageError(f'features {path} unreadable ({e})') from None
  if a.ndim != 2 or not a.size:
    raise html_pages.PageError(f'features {path}: need a 2-D [patches, dim] array, got {a.shape}')
  a = a.astype(np.float16)
  if not np.isfinite(a).all():
    raise html_pages.PageError(f'features {path}: not finite in float16 (|x| <= 65504)')
  return {'features': a.tobytes(), 'num_patches': len(a), 'dim': int(a.shape[1])}


def _parse_job(job) -> dict:
  """Worker of the features path: one page -> its spill entry, or {'id', 'skipped': reason}."""
  html_dir, rel, features_dir, scheme, max_chars = job
  try:
    with open(os.path.join(html_dir, rel), 'rb') as f:
      page = html_pages.parse_page(f.read(), scheme=scheme, max_chars=max_chars)
    return _entry(rel, page, _features(features_dir, rel))
  except OSError as e:
    return {'id': rel, 'skipped': f'unreadable ({e.strerror or e})'}
  except html_pages.PageError as e:
    return {'id': rel, 'skipped': str(e)}
  except Exception as e:  # noqa: BLE001 - a parser bug on one odd page must not end the run
    return {'id': rel, 'skipped': f'parse failed ({type(e).__name__}: {e})'}


def _rendered_entry(rel, shot, *, scheme, max_chars, patch_size, max_patches) -> dict:
  """A rendered page -> its spill entry (its DOM's visible part as target, its pixels as input).
  Runs in the render worker that made the screenshot."""
  try:
    page = html_pages.parse_page(shot.html, scheme=scheme, rendered=True,
                                 max_height=shot.height, max_chars=max_chars)
  except html_pages.PageError as e:
    return {'id': rel, 'skipped': str(e), 'blocked': shot.blocked}
  except Exception as e:  # noqa: BLE001 - a parser bug on one odd page must not end the run
    return {'id': rel, 'skipped': f'parse failed ({type(e).__name__}: {e})',
            'blocked': shot.blocked}
  image_HxWx3 = patches.decode_png(shot.png)
  patches_PxD, positions_Px2 = patches.to_patches(image_HxWx3, patch_size=patch_size,
                                                  max_patches=max_patches)
  labels_Px2 = patches.patch_labels(page.boxes_Nx6, positions_Px2, height=image_HxWx3.shape[0],
                                    width=image_HxWx3.shape[1])
  # The visible text with the patches it lies on; assemble.py tokenizes it (the BPE trains there).
  on_patches = patches.block_patches([b.box for b in shot.text_blocks], positions_Px2,
                                     height=image_HxWx3.shape[0], width=image_HxWx3.shape[1])
  text_blocks = [[b.text, p] for b, p in zip(shot.text_blocks, on_patches, strict=True) if p]
  return {**_entry(rel, page, {'patches': patches_PxD.tobytes(),
                               'positions': positions_Px2.astype(np.int16).tobytes(),
                               'patch_labels': labels_Px2.tobytes(), 'text_blocks': text_blocks,
                               'num_patches': len(patches_PxD)}), 'blocked': shot.blocked}


def converted(html_dir, rels, *, features_dir, render_spec, scheme, max_chars, patch_size,
              max_patches, workers):
  """Yields each page's spill entry or {'id', 'skipped'} (pass 1)."""
  if render_spec is not None:
    convert = functools.partial(_rendered_entry, scheme=scheme, max_chars=max_chars,
                                patch_size=patch_size, max_patches=max_patches)
    for rel, entry in render_pool.render_pages(html_dir, rels, render_spec, workers=workers,
                                               convert=convert):
      yield {'id': rel, 'skipped': entry} if isinstance(entry, str) else entry
    return
  jobs = [(html_dir, rel, features_dir, scheme, max_chars) for rel in rels]
  if workers > 1:
    ctx = multiprocessing.get_context('spawn')   # fork is unsafe once jax has started threads
    with ctx.Pool(workers) as pool:
      yield from pool.imap(_parse_job, jobs, chunksize=16)
  else:
    yield from map(_parse_job, jobs)


def write_part(out_parts, index, count, entries, *, total, features_dir, progress) -> dict:
  """Pass 1 for one part: `entries` (converted's, for `total` pages) into its spill file and its
  summary, written atomically into out_parts."""
  os.makedirs(out_parts, exist_ok=True)
  name = os.path.join(out_parts, f'part-{index:05d}-of-{count:05d}')
  kept, skipped, blocked, dims = 0, [], 0, set()
  start = time.perf_counter()
  with open(name + '.spill.tmp', 'wb') as spill:
    for r in tqdm.tqdm(entries, total=total, desc='Converting', disable=not progress,
                       unit='page'):
      blocked += r.pop('blocked', 0)
      if 'skipped' in r:
        skipped.append({'path': r['id'], 'reason': r['skipped']})
        continue
      dims.add(r.pop('dim', None))
      spill.write(msgpack.packb(r, use_bin_type=True))
      kept += 1
  seconds = time.perf_counter() - start
  if len(dims) > 1:
    os.remove(name + '.spill.tmp')
    raise PrepareError(f'--features_dir {features_dir}: feature widths differ '
                       f'between pages ({sorted(dims)})')
  part = {'index': index, 'count': count, 'pages_found': total, 'pages_kept': kept,
          'skipped': skipped, 'requests_blocked': blocked, 'seconds': seconds,
          'feature_dim': dims.pop() if dims else None}
  os.replace(name + '.spill.tmp', name + '.spill')
  with open(name + '.json.tmp', 'w') as f:
    json.dump(part, f)
  os.replace(name + '.json.tmp', name + '.json')
  return part


def remove_part(parts_dir: str, index: int, count: int) -> None:
  """Deletes what a failed run of part `index` wrote (its settings, its spill, temporaries), so
  --merge never sees half of it."""
  name = os.path.join(parts_dir, f'part-{index:05d}-of-{count:05d}')
  for path in (os.path.join(parts_dir, f'settings-{index:05d}.json'), name + '.spill',
               name + '.spill.tmp', name + '.json', name + '.json.tmp'):
    if os.path.exists(path):
      os.remove(path)
