"""How much a trained model reads its input: val metrics with each page's own input against the
same pages given another page's input (page i reads page i + n/2's screenshot or features).

    python benchmarks/input_ablation.py --workdir RUN [--checkpoint best]

A model that ignores its input scores the same both ways; the gap is what the input is worth.
Teacher-forced, as training's evaluation (no decoding). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from phase1_jax import specs
from phase1_jax.data import pipeline
from phase1_jax.inference import evaluation

SHOWN = ('val_loss', 'val_loss_detail', 'token_accuracy', 'element_f1', 'element_f1_macro',
         'semantic_accuracy')


class SwappedInputs:
  """A source whose page i carries page (i + len/2)'s input, with its own targets."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    page = dict(self.source[index])
    other = self.source[(index + len(self) // 2) % len(self)]
    page['features'], page['feature_mask'] = other['features'], other['feature_mask']
    return page


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--checkpoint', default='best', choices=('best', 'latest'))
  args = parser.parse_args()
  run = specs.run_spec(specs.load_run_config(args.workdir))
  graphdef, params, step, _ = evaluation.load_trained(run, args.workdir, which=args.checkpoint)
  # Losses only: no decoding, no rendering.
  losses_only = dataclasses.replace(run.eval, bleu_samples=0, render=None)
  evaluate = evaluation.Evaluator(losses_only, graphdef)
  source = pipeline.make_source(run.data, 'val')
  out = {'checkpoint_step': int(step), 'pages': len(source)}
  for name, src in (('own_input', source), ('another_pages_input', SwappedInputs(source))):
    result = evaluate(params, src)
    out[name] = {k: result[k] for k in SHOWN}
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  main()
