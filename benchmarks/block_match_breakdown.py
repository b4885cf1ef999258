"""Where block match is won and lost: the reference's text blocks by word count, per answer.

    python -m phase1_jax.generate --workdir RUN --num_samples 200 --output RUN/gen.jsonl
    python benchmarks/block_match_breakdown.py --data DIR --generations RUN/gen.jsonl

Renders the first --samples val pages' reference markup, the model's generated pages (the
generate CLI's JSON Lines, val order) and the two answering baselines (phase1_jax.baselines:
the constant page, the nearest train page by pixels), matches each answer's text blocks to the
reference's as visual_metrics.block_scores does, and prints, for reference blocks of 1, 2, 3
and 4+ words, their share of the reference's block area and the share of it each answer
matched, and the words per text block each answer writes; above it, each answer's visual metrics
(as evaluate's `visual_*`). Block match weighs blocks by area, so an answer that never writes a
multi-word block loses most of the page whatever else it gets right. --output: the table as
JSON.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from phase1_jax import baselines, render_metrics, visual_metrics
from phase1_jax.data import bpe, records, render

BUCKETS = ('1 word', '2 words', '3 words', '4+ words')


def _bucket(text: str) -> int:
  return min(len(text.split()), len(BUCKETS)) - 1


def breakdown(answers: dict, references: list) -> dict:
  """{answer: {bucket: matched share of the reference area in that bucket}, 'words_per_block'}
  plus 'reference': each bucket's share of the whole reference block area."""
  area_K = np.zeros(len(BUCKETS))
  for ref in references:
    for block, area in zip(ref.blocks, visual_metrics.block_areas_N(ref), strict=True):
      area_K[_bucket(block.text)] += area
  out = {'reference': dict(zip(BUCKETS, (area_K / area_K.sum()).round(3).tolist(), strict=True))}
  for name, renders in answers.items():
    matched_K, words = np.zeros(len(BUCKETS)), []
    for gen, ref in zip(renders, references, strict=True):
      areas = visual_metrics.block_areas_N(ref)
      for _, r, _ in visual_metrics.match_blocks(gen, ref):
        matched_K[_bucket(ref.blocks[r].text)] += areas[r]
      words += [len(b.text.split()) for b in gen.blocks]
    shares = (matched_K / np.maximum(area_K, 1e-9)).round(3).tolist()
    out[name] = {**dict(zip(BUCKETS, shares, strict=True)),
                 'words_per_block': round(float(np.mean(words)) if words else 0.0, 2)}
  out['reference']['words_per_block'] = round(float(np.mean(
      [len(b.text.split()) for ref in references for b in ref.blocks])), 2)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data', required=True, help='the prepared pixel dataset')
  parser.add_argument('--generations', required=True, help='python -m phase1_jax.generate output')
  parser.add_argument('--samples', type=int, default=200)
  parser.add_argument('--max_seq_len', type=int, default=256)
  parser.add_argument('--max_patches', type=int, default=256)
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--browser', default=None)
  parser.add_argument('--output', default=None)
  args = parser.parse_args()
  meta = records.read_metadata(args.data)
  tok = bpe.load(os.path.join(args.data, records.TOKENIZER_FILE))
  with open(args.generations) as f:
    generated = [json.loads(line)['markup'] for line in f][:args.samples]
  n = len(generated)
  train, val = (baselines.split_pages(args.data, s, args.max_seq_len, args.max_patches, True)
                for s in ('train', 'val'))
  constant = baselines.constant_page(train, baselines.target_strings(meta, train))
  nearest = baselines.nearest_pages(train, val[:n])
  train_src, val_src = (records.FilePages(args.data, s, max_seq_len=1, num_patches=1)
                        for s in ('train', 'val'))
  markup = lambda src, i: bpe.decode(tok, src.record(int(i))['tokens'])
  spec = render.RenderSpec(width=int(meta['render']['width']),
                           max_height=int(meta['render'].get('max_height', 2048)),
                           javascript=bool(meta['render'].get('javascript', False)),
                           browser=args.browser)
  draw = lambda markups: render_metrics.render_markups(markups, spec, workers=args.workers)
  references = draw([markup(val_src, i) for i in range(n)])
  answers = {'model': draw(generated),
             'constant page': draw([markup(train_src, constant)] * n),
             'nearest neighbour': draw([markup(train_src, i) for i in nearest])}
  keep = [i for i, r in enumerate(references) if r.ok]
  out = breakdown({k: [v[i] for i in keep] for k, v in answers.items()},
                  [references[i] for i in keep])
  for name, renders in answers.items():
    scores = visual_metrics.summarize([visual_metrics.compare(renders[i], references[i])
                                       for i in keep])
    print(f'{name}: ' + '  '.join(f'{m} {scores[m]:.3f}' for m in visual_metrics.METRICS))
  header = ['matched share of the reference area', *BUCKETS, 'words/block']
  print(' | '.join(header))
  for name, row in out.items():
    label = 'reference: area share' if name == 'reference' else name
    print(' | '.join([label] + [f'{row[k]:.3f}' for k in BUCKETS] + [f"{row['words_per_block']}"]))
  if args.output:
    with open(args.output, 'w') as f:
      json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()
