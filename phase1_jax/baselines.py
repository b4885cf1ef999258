"""Trivial baselines of a prepared dataset's val split, scored as `evaluate` scores the model.

    python -m phase1_jax.baselines --data DIR [--max_seq_len 256] [--max_patches 256]
        [--render_samples 64] [--workers 2] [--output FILE]

- majority elements: each element type predicted present when it is on most train pages;
- majority section: every token gets the most frequent train section class;
- constant page: one train page (constant_page) as every val page's answer;
- nearest neighbour: the train page whose picture is nearest (nearest_pages).
The two answering baselines are scored as a generated page: BLEU of the answer's markup, its
element labels as the element prediction (element_f1, element_f1_macro), and its per-token
section labels as the section classes of its tokens (semantic_accuracy, by
metrics.aligned_semantic_counts: the answer's tokens aligned with the val page's).
A ceiling rather than a baseline, on BPE datasets (a tokenizer.json):
- layout oracle: each val page's own markup with every text node replaced by the train pages'
  most frequent text node: a model that gets every tag and attribute right but reads no word.
BLEU over BPE token strings, as training's evaluation. On a pixel dataset the markup baselines
(constant page, nearest neighbour, layout oracle) are also rendered and scored with
visual_metrics (`visual` of each) against the first --render_samples val pages' reference markup
(their full decoded tokens) at the dataset's render width, the references rendered once
(`visual_reference`). --render_samples 0 switches this off.
Prints one JSON object and writes it atomically to DIR/baselines.json (BASELINES_FILE; --output:
elsewhere), where `load(DIR)` finds it; `comparison_table(model, baselines)` sets a model's
evaluation result beside them as a text table.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

import numpy as np

from phase1_jax import metrics, render_metrics, visual_metrics
from phase1_jax.data import bpe, records, render, vocab

BASELINES_FILE = 'baselines.json'   # in the prepared dataset's directory
KEEP = ('targets', 'element_labels', 'semantic_labels', 'semantic_mask')


def split_pages(directory, split, max_seq_len, max_patches, pixels):
  """A split's targets and labels, and each page's picture reduced to a vector: each real patch's
  mean colour (pixels) or its features, patch by patch in reading order."""
  src = records.FilePages(directory, split, max_seq_len=max_seq_len, num_patches=max_patches)
  pages = []
  for i in range(len(src)):
    ex = src[i]
    f = ex['features'] * ex['feature_mask'][:, None]
    picture = f[:, 2:].reshape(len(f), -1, 3).mean(1) if pixels else f
    pages.append({**{k: ex[k] for k in KEEP}, 'picture': picture.ravel()})
  return pages


def baselines(directory: str, max_seq_len: int, max_patches: int, render_samples: int = 0,
              workers: int = 2, browser: str | None = None) -> dict:
  """Every baseline's scores (see the module docstring); render_samples > 0 adds the visual
  metrics on a pixel dataset with a tokenizer."""
  meta = records.read_metadata(directory)
  pixels = records.input_kind(meta) == 'pixels'
  train, val = (split_pages(directory, s, max_seq_len, max_patches, pixels)
                for s in ('train', 'val'))
  train_text, val_text = target_strings(meta, train), target_strings(meta, val)
  out = {'val_pages': len(val), 'train_pages': len(train), **_majority(meta, train, val)}
  best, nearest = constant_page(train, train_text), nearest_pages(train, val)
  out['constant_page'] = _answer_scores(train, val, [best] * len(val), train_text, val_text)
  out['nearest_neighbour'] = _answer_scores(train, val, nearest, train_text, val_text)
  tokenizer_path = os.path.join(directory, records.TOKENIZER_FILE)
  tok = bpe.load(tokenizer_path) if os.path.exists(tokenizer_path) else None
  if tok is not None:
    out['layout_oracle'] = {'bleu': _layout_oracle_bleu(tok, meta, train, val, val_text,
                                                        max_seq_len)}
  if render_samples > 0 and pixels and tok is not None:
    answers = {'constant_page': lambda i: best, 'nearest_neighbour': lambda i: nearest[i]}
    _visual(out, directory, meta, tok, answers, _text_word(tok, train),
            min(render_samples, len(val)), workers, browser)
  elif render_samples > 0:
    out['visual_metrics'] = 'off: needs a pixel dataset with a BPE tokenizer'
  return out


def target_strings(meta, pages) -> list[str]:
  """split_pages' targets as the token strings BLEU compares."""
  return metrics.tokens_to_strings(
      np.stack([p['targets'] for p in pages]), vocab.id_to_token(meta['vocab_size']),
      eos_id=vocab.EOS_ID, pad_id=vocab.PAD_ID, bos_id=vocab.BOS_ID)


def constant_page(train, train_text) -> int:
  """The constant page's train index: of 40 random train pages, the best by BLEU against 200
  others (seeded)."""
  rng = np.random.default_rng(0)
  probe = rng.choice(len(train), min(200, len(train)), replace=False)
  candidates = rng.choice(len(train), min(40, len(train)), replace=False)
  return int(max(candidates, key=lambda c: metrics.bleu([train_text[c]] * len(probe),
                                                         [train_text[i] for i in probe])))


def nearest_pages(train, val) -> list[int]:
  """Each val page's nearest train page by picture in L2: its screenshot as each patch's mean
  colour in reading order (split_pages), or its features."""
  train_x = np.stack([p['picture'] for p in train])
  return [int(np.argmin(((train_x - p['picture']) ** 2).sum(1))) for p in val]


def _majority(meta, train, val) -> dict:
  """majority_elements (the types on most train pages, for every val page) and
  majority_section (the most frequent train section class, for every token)."""
  labels = lambda ps: np.stack([p['element_labels'] for p in ps])
  majority = (labels(train).mean(0) > 0.5).astype(np.float32)
  scores = metrics.element_scores(np.tile(majority, (len(val), 1)), labels(val))
  classes = np.concatenate([p['semantic_labels'][p['semantic_mask']] for p in train])
  top = int(np.bincount(classes).argmax())
  sem = lambda key: np.stack([p[key] for p in val])
  accuracy = metrics.semantic_accuracy(np.full_like(sem('semantic_labels'), top),
                                       sem('semantic_labels'), sem('semantic_mask'))
  return {'majority_elements': {k: scores[k] for k in ('element_f1', 'element_f1_macro')},
          'majority_section': {'class': meta['semantic_classes'][top],
                               'semantic_accuracy': accuracy}}


def _answer_scores(train, val, answer_V, train_text, val_text) -> dict:
  """A markup baseline that answers val page v with train page answer_V[v]: BLEU, the answer's
  element labels as element predictions, and its per-token section labels as the section
  classes of its tokens, aligned with the val page's (metrics.aligned_semantic_counts; a token
  the answer page gives no section is wrong)."""
  answers = [train[i] for i in answer_V]
  element_scores = metrics.element_scores(
      np.stack([p['element_labels'] for p in answers]),
      np.stack([p['element_labels'] for p in val]))
  column = lambda ps, key: [p[key] for p in ps]
  semantic = metrics.aligned_semantic_accuracy(
      column(answers, 'targets'),
      [np.where(p['semantic_mask'], p['semantic_labels'], -1) for p in answers],
      column(val, 'targets'), column(val, 'semantic_labels'), column(val, 'semantic_mask'),
      eos_id=vocab.EOS_ID)
  return {'bleu': metrics.bleu([train_text[i] for i in answer_V], val_text),
          'element_f1': element_scores['element_f1'],
          'element_f1_macro': element_scores['element_f1_macro'],
          'semantic_accuracy': semantic}


def _visual(out, directory, meta, tok, answers, word, samples, workers, browser) -> None:
  """Adds `visual` (render_metrics.score_pages) to each markup baseline of `out`: the first
  `samples` val pages' full reference markup rendered once, each baseline's answer beside it."""
  spec = render.RenderSpec(width=int(meta['render']['width']),
                           max_height=int(meta['render'].get('max_height', 2048)),
                           javascript=bool(meta['render'].get('javascript', False)),
                           browser=browser)
  train_src, val_src = (records.FilePages(directory, s, max_seq_len=1, num_patches=1)
                        for s in ('train', 'val'))
  markup = lambda src, i: bpe.decode(tok, src.record(int(i))['tokens'])
  reference = [markup(val_src, i) for i in range(samples)]
  start = time.perf_counter()
  reference_renders = render_metrics.render_markups(reference, spec, workers=workers)
  out['visual_reference'] = {'pages': samples, 'render_seconds': time.perf_counter() - start,
                             'render_failures': sum(not r.ok for r in reference_renders),
                             'width': spec.width}
  for name, train_index in answers.items():
    generated = [markup(train_src, train_index(i)) for i in range(samples)]
    out[name]['visual'] = render_metrics.score_pages(
        generated, None, spec, workers, reference_renders=reference_renders)
  if 'layout_oracle' in out:
    generated = [_TEXT_NODE.sub(word, m) for m in reference]
    out['layout_oracle']['visual'] = render_metrics.score_pages(
        generated, None, spec, workers, reference_renders=reference_renders)


# A text node: the characters between a tag's '>' and the next '<' holding a non-space.
_TEXT_NODE = re.compile(r'(?<=>)([^<]*[^<\s][^<]*)(?=<)')


def _text_word(tok, train) -> str:
  """The train pages' most frequent text node (in their scored targets)."""
  counts = collections.Counter(
      m.strip() for p in train for m in _TEXT_NODE.findall(bpe.decode(tok, p['targets'])))
  return counts.most_common(1)[0][0] if counts else ''


def _layout_oracle_bleu(tok, meta, train, val, val_text, max_seq_len) -> float:
  """BLEU of the val pages' markup with each text node replaced by the most frequent train
  text node, re-tokenized and cut to the scored length."""
  word = _text_word(tok, train)
  pages = []
  for p in val:
    ids = tok.encode(_TEXT_NODE.sub(word, bpe.decode(tok, p['targets']))).ids[:max_seq_len - 1]
    ids = ids + [vocab.EOS_ID] + [vocab.PAD_ID] * (max_seq_len - 1 - len(ids))
    pages.append({'targets': np.asarray(ids, np.int32)})
  return metrics.bleu(target_strings(meta, pages), val_text)


def write(path: str, out: dict) -> None:
  """Writes `out` as JSON to `path` atomically (a temporary file beside it, then os.replace),
  so a reader never sees half a file."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(json.dumps(out, indent=1) + '\n')
  os.replace(tmp, path)


def load(directory: str) -> dict | None:
  """The baselines written into a prepared dataset `directory` (BASELINES_FILE), or None when
  they were never computed; a file that is not a JSON object raises records.DatasetError."""
  path = os.path.join(directory, BASELINES_FILE)
  try:
    with open(path) as f:
      out = json.load(f)
  except FileNotFoundError:
    return None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise records.DatasetError(f'{path}: not valid JSON ({e}); run python -m '
                               f'phase1_jax.baselines --data {directory} again') from None
  if not isinstance(out, dict):
    raise records.DatasetError(f'{path}: not a JSON object but {type(out).__name__}')
  return out


# The comparison table's columns: (header, key of the baseline in the baselines JSON).
COLUMNS = (('majority elements', 'majority_elements'), ('majority section', 'majority_section'),
           ('constant page', 'constant_page'), ('nearest neighbour', 'nearest_neighbour'),
           ('layout oracle (ceiling)', 'layout_oracle'))
# Its markup rows: (label, key in the evaluation result and in a baseline entry).
ROWS = (('BLEU', 'bleu'), ('element F1', 'element_f1'), ('element F1 macro', 'element_f1_macro'),
        ('semantic accuracy', 'semantic_accuracy'))


def _number(value) -> float | None:
  """value as a float, or None when it is missing or not a number."""
  ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
  return float(value) if ok else None


def _table_rows(model: dict, baselines: dict) -> list[list[str]]:
  """Each metric's label and cells (model first, then COLUMNS; '-' where missing), leaving out
  the metrics nobody has."""
  entries = [baselines.get(key) or {} for _, key in COLUMNS]
  getters = [(label, lambda d, k=key: d.get(k), lambda e, k=key: e.get(k))
             for label, key in ROWS]
  getters += [(f'visual {m}', lambda d, m=m: d.get(f'visual_{m}'),
               lambda e, m=m: (e.get('visual') or {}).get(m)) for m in visual_metrics.METRICS]
  rows = []
  for label, of_model, of_baseline in getters:
    values = [_number(of_model(model))] + [_number(of_baseline(e)) for e in entries]
    if any(v is not None for v in values):
      rows.append([label] + ['-' if v is None else f'{v:.3f}' for v in values])
  return rows


def comparison_table(model: dict, baselines: dict) -> str:
  """The model's evaluation result beside the baselines (this module's JSON) as a fixed-width
  text table, one row per metric, values to 3 decimals, '-' where a column lacks the metric;
  below it, a line naming the val pages each side's visual metrics were scored on when they
  differ. The model's semantic_accuracy row is what `model` holds under that key (on a pixel
  dataset evaluate's reads the generated markup, aligned as the answering baselines' own tokens
  are; on a features dataset it is teacher-forced)."""
  header = ['metric', 'model'] + [h for h, _ in COLUMNS]
  rows = [header] + _table_rows(model, baselines)
  widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
  lines = ['  '.join([r[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in
                                                  zip(r[1:], widths[1:], strict=True)]).rstrip()
           for r in rows]
  model_pages = model.get('visual_pages')
  baseline_pages = (baselines.get('visual_reference') or {}).get('pages')
  if model_pages != baseline_pages:
    name = lambda n: 'none' if n is None else f'{n}'
    lines.append(f'visual metrics: model on {name(model_pages)} val pages, '
                 f'baselines on {name(baseline_pages)}')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data', required=True)
  parser.add_argument('--max_seq_len', type=int, default=256)
  parser.add_argument('--max_patches', type=int, default=256)
  parser.add_argument('--render_samples', type=int, default=64,
                      help='val pages rendered for the visual metrics (pixel datasets); 0: off')
  parser.add_argument('--workers', type=int, default=2, help='render worker processes')
  parser.add_argument('--browser', default=None, help='Chromium executable (default: found)')
  parser.add_argument('--output', default=None,
                      help=f'write the JSON here (default: DATA/{BASELINES_FILE})')
  args = parser.parse_args()
  try:
    out = baselines(args.data, args.max_seq_len, args.max_patches, args.render_samples,
                    args.workers, args.browser)
  except (records.DatasetError, render.RenderUnavailable, ValueError) as e:
    sys.exit(f'error: {e}')
  print(json.dumps(out, indent=1))
  path = args.output or os.path.join(args.data, BASELINES_FILE)
  try:
    write(path, out)
  except OSError as e:
    sys.exit(f'error: {path}: cannot write ({e})')


if __name__ == '__main__':
  main()
