"""HTML folder -> prepared page dataset (records.py's format).

    python -m phase1_jax.data.prepare --html_dir pages/ --out data/pages --render \
        --browser /usr/bin/chromium
    python -m phase1_jax.data.prepare --html_dir pages/ --out data/pages --features_dir feats/

A page's input is its screenshot (`--render`: Chromium through Playwright, cut into patches
Pix2Struct-style) or the user's features (`--features_dir`, <page path without suffix>.npy of
[patches, dim]); its targets come from its HTML (html_pages.py). Two streaming passes keep memory
bounded: (1) convert.py renders / parses every page (parallel workers) into a spill file of
msgpack entries, (2) assemble.py trains the BPE and writes the records. The output appears only
when complete: the run writes into OUT.incomplete and renames it. Scale out with `--num_shards K
--shard_index i` (each run, on any machine sharing OUT, does pass 1 for its pages), then
`--merge`.
A page that cannot be read, parsed or rendered is skipped and reported, never fatal.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import zlib

from absl import app, flags

from phase1_jax.data import assemble, bpe, html_labels, render
from phase1_jax.data.assemble import PARTS_DIR, PrepareError, merge

# Pass 1 lives in convert.py; prepare() converts through the name _converted here (tests replace
# it to make a part fail).
from phase1_jax.data.convert import converted as _converted
from phase1_jax.data.convert import remove_part, write_part

HTML_SUFFIXES = ('.html', '.htm')
CHARS_PER_TOKEN_CAP = 8    # markup is cut at this many characters per stored token


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


def _check_args(html_dir, out, *, vocab_size, val_fraction, features_dir, render_spec, patch_size,
                max_patches, max_tokens, records_per_shard, workers, num_shards, shard_index):
  """Raises PrepareError naming the first bad flag, before anything is written."""
  if not 0 <= val_fraction < 1:
    raise PrepareError(f'--val_fraction {val_fraction}: must be in [0, 1)')
  if not bpe.MIN_VOCAB_SIZE <= vocab_size <= bpe.MAX_VOCAB_SIZE:
    raise PrepareError(f'--vocab_size {vocab_size}: must be in [{bpe.MIN_VOCAB_SIZE}, '
                       f'{bpe.MAX_VOCAB_SIZE}]')
  if (render_spec is None) == (features_dir is None):
    raise PrepareError('--render or --features_dir: give exactly one (the pages\' screenshots, '
                       'or your own features per page)')
  if features_dir is not None and not os.path.isdir(features_dir):
    raise PrepareError(f'--features_dir {features_dir}: not a directory')
  if render_spec is not None:
    if patch_size < 1 or max_patches < 1:
      raise PrepareError(f'--patch_size {patch_size} / --max_patches {max_patches}: must be >= 1')
    try:
      render.check_available(render_spec)
    except render.RenderUnavailable as e:
      raise PrepareError(f'--render: {e}') from None
  for flag, value, least in (('--max_tokens', max_tokens, 1),
                            ('--records_per_shard', records_per_shard, 1),
                            ('--workers', workers, 0)):
    if value < least:
      raise PrepareError(f'{flag} {value}: must be >= {least}')
  if not 0 <= shard_index < num_shards:
    raise PrepareError(f'--shard_index {shard_index}: must be in [0, --num_shards {num_shards})')
  if num_shards == 1 and os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise PrepareError(f'--out {out}: exists and is not empty (choose a new directory)')
  find_pages(html_dir)


def prepare(html_dir: str, out: str, *, vocab_size: int = 8000, val_fraction: float = 0.1,
            features_dir: str | None = None, render_spec: render.RenderSpec | None = None,
            patch_size: int = 16, max_patches: int = 1024, class_keywords: bool = False,
            max_tokens: int = 2048, workers: int = 0, records_per_shard: int = 1000,
            num_shards: int = 1, shard_index: int = 0, progress: bool = True) -> dict | None:
  """Converts html_dir into a prepared dataset in `out`. Returns dataset.json, or None for one
  shard of several (then `merge(out)` once every shard is written)."""
  _check_args(html_dir, out, vocab_size=vocab_size, val_fraction=val_fraction,
              features_dir=features_dir, render_spec=render_spec, patch_size=patch_size,
              max_patches=max_patches, max_tokens=max_tokens,
              records_per_shard=records_per_shard, workers=workers, num_shards=num_shards,
              shard_index=shard_index)
  rels = [r for r in find_pages(html_dir) if zlib.crc32(r.encode()) % num_shards == shard_index]
  scheme = html_labels.LabelScheme(class_keywords=class_keywords)
  # Auto: a spawned worker takes a moment to start (a new interpreter importing the data
  # modules), so small corpora are parsed in this process. Rendering runs a browser per worker:
  # one per core.
  workers = workers or (min(4, os.cpu_count() or 1) if render_spec else
                        min(4, os.cpu_count() or 1, max(1, len(rels) // 200)))
  settings = dict(features_dir=features_dir, render_spec=render_spec, scheme=scheme,
                  max_chars=max_tokens * CHARS_PER_TOKEN_CAP, patch_size=patch_size,
                  max_patches=max_patches, workers=workers)
  info = {'semantic_classes': list(scheme.semantic_classes),
          'element_types': list(scheme.element_types), 'class_keywords': class_keywords,
          'input': 'pixels' if render_spec else 'features'}
  if render_spec:
    info.update(patch_size=patch_size, max_patches=max_patches,
                render={'width': render_spec.width, 'max_height': render_spec.max_height,
                        'javascript': render_spec.javascript})
  work = out if num_shards > 1 else out.rstrip(os.sep) + '.incomplete'
  if num_shards == 1:
    shutil.rmtree(work, ignore_errors=True)     # what a failed earlier run left
  try:
    # The settings first: merge takes a part as done once its part-*.json exists.
    os.makedirs(os.path.join(work, PARTS_DIR), exist_ok=True)
    with open(os.path.join(work, PARTS_DIR, f'settings-{shard_index:05d}.json'), 'w') as f:
      json.dump(info, f)
    part = write_part(os.path.join(work, PARTS_DIR), shard_index, num_shards,
                      _converted(html_dir, rels, **settings), total=len(rels),
                      features_dir=features_dir, progress=progress)
    if num_shards > 1:
      print(f'Part {shard_index} of {num_shards}: {part["pages_kept"]} pages converted, '
            f'{len(part["skipped"])} skipped; run --merge --out {out} when all parts are done')
      return None
    metadata = merge(work, vocab_size=vocab_size, val_fraction=val_fraction,
                     max_tokens=max_tokens, records_per_shard=records_per_shard,
                     progress=progress, html_dir=html_dir, quiet=True)
    if os.path.isdir(out):
      os.rmdir(out)                      # checked empty above
    os.replace(work, out)
  except BaseException:
    if num_shards == 1:
      shutil.rmtree(work, ignore_errors=True)
    else:                   # the other parts in OUT stay
      remove_part(os.path.join(work, PARTS_DIR), shard_index, num_shards)
    raise
  print(assemble.summary_text(metadata))
  return metadata


_HTML_DIR = flags.DEFINE_string('html_dir', None, 'Folder tree of .html/.htm pages.')
_OUT = flags.DEFINE_string('out', None, 'New (or empty) output directory (shared by --num_shards '
                           'runs).')
_VOCAB = flags.DEFINE_integer('vocab_size', 8000, 'BPE vocabulary size (300..50000).')
_VAL = flags.DEFINE_float('val_fraction', 0.1, 'Share of pages in the val split.')
_FEATURES = flags.DEFINE_string('features_dir', None,
                                'Your features: <page path without suffix>.npy of [P, F].')
_RENDER = flags.DEFINE_boolean('render', False, 'Screenshots by Chromium as the input.')
_BROWSER = flags.DEFINE_string('browser', None, 'Chromium executable (default: Playwright\'s, '
                               'else chromium on PATH).')
_WIDTH = flags.DEFINE_integer('width', 1024, 'Viewport width, CSS px.')
_MAX_HEIGHT = flags.DEFINE_integer('max_height', 2048, 'Screenshot height cap, CSS px.')
_TIMEOUT = flags.DEFINE_float('timeout', 10.0, 'Seconds a page may take to load.')
_JAVASCRIPT = flags.DEFINE_boolean('javascript', False, 'Run the pages\' scripts.')
_PATCH = flags.DEFINE_integer('patch_size', 16, 'Patch side, pixels.')
_MAX_PATCHES = flags.DEFINE_integer('max_patches', 1024, 'Patches per screenshot at most.')
_KEYWORDS = flags.DEFINE_boolean('class_keywords', False, 'Also label from class names and ids '
                                 '(component-named corpora; 50 section classes).')
_MAX_TOKENS = flags.DEFINE_integer('max_tokens', 2048, 'Tokens stored per page at most.')
_WORKERS = flags.DEFINE_integer('workers', 0, 'Processes (0: auto).')
_SHARD = flags.DEFINE_integer('records_per_shard', 1000, 'Records per ArrayRecord shard.')
_NUM_SHARDS = flags.DEFINE_integer('num_shards', 1, 'Split the conversion into this many runs.')
_SHARD_INDEX = flags.DEFINE_integer('shard_index', 0, 'This run\'s piece, < --num_shards.')
_MERGE = flags.DEFINE_boolean('merge', False, 'Assemble the dataset from the --num_shards parts '
                              'in --out.')


def main(argv):
  del argv
  progress = sys.stderr.isatty()    # bars only for a person watching: a log keeps the summary
  try:
    if _MERGE.value:
      merge(_OUT.value, vocab_size=_VOCAB.value, val_fraction=_VAL.value,
            max_tokens=_MAX_TOKENS.value, records_per_shard=_SHARD.value, progress=progress)
      return
    if not _HTML_DIR.value:
      raise PrepareError('--html_dir: required (unless --merge)')
    try:
      spec = render.RenderSpec(width=_WIDTH.value, max_height=_MAX_HEIGHT.value,
                               timeout_s=_TIMEOUT.value, javascript=_JAVASCRIPT.value,
                               browser=_BROWSER.value) if _RENDER.value else None
    except ValueError as e:       # a bad --width, --max_height or --timeout
      raise PrepareError(f'--render: {e}') from None
    prepare(_HTML_DIR.value, _OUT.value, vocab_size=_VOCAB.value, val_fraction=_VAL.value,
            features_dir=_FEATURES.value, render_spec=spec, patch_size=_PATCH.value,
            max_patches=_MAX_PATCHES.value, class_keywords=_KEYWORDS.value,
            max_tokens=_MAX_TOKENS.value, workers=_WORKERS.value,
            records_per_shard=_SHARD.value, num_shards=_NUM_SHARDS.value,
            shard_index=_SHARD_INDEX.value, progress=progress)
  except (PrepareError, OSError) as e:   # a bad flag or folder, an unwritable --out: one line
    sys.exit(f'prepare: {e}')


if __name__ == '__main__':
  from phase1_jax.config_validation import parse_flags  # not in the workers: they never parse
  flags.mark_flags_as_required(['out'])
  app.run(main, flags_parser=parse_flags)     # a bad or unknown flag: one line
