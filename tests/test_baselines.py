"""phase1_jax.baselines without a browser or a dataset: the comparison table evaluate prints and
loading the baselines file. (The CLI itself is tested on a rendered dataset at the end of
tests/test_render_metrics.py.)"""
from __future__ import annotations

import json

import pytest

from phase1_jax import baselines, visual_metrics
from phase1_jax.data import records

MODEL = {'bleu': 0.3125, 'element_f1': 0.9, 'element_f1_macro': 0.8, 'semantic_accuracy': 0.75,
         'val_loss': 1.5, 'visual_pages': 64,
         **{f'visual_{m}': 0.5 for m in visual_metrics.METRICS}}
BASELINES = {
    'val_pages': 100, 'train_pages': 900,
    'majority_elements': {'element_f1': 0.61, 'element_f1_macro': 0.2},
    'majority_section': {'class': 'main', 'semantic_accuracy': 0.4},
    'constant_page': {'bleu': 0.1, 'element_f1': 0.55, 'element_f1_macro': 0.3,
                      'semantic_accuracy': 0.2, 'visual': {'ssim': 0.25, 'pages': 32}},
    'nearest_neighbour': {'bleu': 0.15, 'element_f1': 0.7, 'element_f1_macro': 0.4,
                          'semantic_accuracy': 0.35},
    'layout_oracle': {'bleu': 0.6, 'visual': {'ssim': 0.9, 'tree_bleu': 1.0}},
    'visual_reference': {'pages': 32},
}


def _cells(table: str) -> dict[str, list[str]]:
  """Each row's cells by its label (labels hold single spaces, cells are split by two)."""
  rows = {}
  for line in table.splitlines()[1:]:
    parts = [p.strip() for p in line.split('  ') if p.strip()]
    rows[parts[0]] = parts[1:]
  return rows


def test_comparison_table_cells_and_missing_metrics():
  table = baselines.comparison_table(MODEL, BASELINES)
  lines = table.splitlines()
  assert lines[0].split()[:2] == ['metric', 'model']
  for header in ('majority elements', 'majority section', 'constant page', 'nearest neighbour',
                 'layout oracle (ceiling)'):
    assert header in lines[0]
  cells = _cells('\n'.join(lines[:-1]))
  #                               model  maj.el. maj.sec. constant nearest oracle
  assert cells['BLEU'] == ['0.312', '-', '-', '0.100', '0.150', '0.600']
  assert cells['element F1'] == ['0.900', '0.610', '-', '0.550', '0.700', '-']
  assert cells['element F1 macro'] == ['0.800', '0.200', '-', '0.300', '0.400', '-']
  assert cells['semantic accuracy'] == ['0.750', '-', '0.400', '0.200', '0.350', '-']
  assert cells['visual ssim'] == ['0.500', '-', '-', '0.250', '-', '0.900']
  assert cells['visual tree_bleu'] == ['0.500', '-', '-', '-', '-', '1.000']
  assert cells['visual render_success'] == ['0.500'] + ['-'] * 5
  assert len(cells) == 4 + len(visual_metrics.METRICS)       # no val_loss, no pages row
  assert len({len(line) for line in lines[:-1]}) == 1     # fixed width: every row as long
  assert lines[0].index('model') + len('model') == lines[1].index('0.312') + len('0.312')
  assert lines[-1] == 'visual metrics: model on 64 val pages, baselines on 32'


def test_comparison_table_leaves_out_rows_nobody_has():
  model = {'bleu': 0.2, 'element_f1': 0.5}
  table = baselines.comparison_table(model, {'constant_page': {'bleu': 0.1}})
  cells = _cells(table)
  assert set(cells) == {'BLEU', 'element F1'}
  assert cells['BLEU'] == ['0.200', '-', '-', '0.100', '-', '-']
  assert cells['element F1'] == ['0.500'] + ['-'] * 5
  assert 'visual metrics' not in table     # neither side scored pages visually
  same = baselines.comparison_table({**MODEL, 'visual_pages': 32}, BASELINES)
  assert 'visual metrics' not in same      # both on the same pages
  only_model = baselines.comparison_table(MODEL, {'constant_page': {'bleu': 0.1}})
  assert only_model.splitlines()[-1] == 'visual metrics: model on 64 val pages, baselines on none'


def test_load_missing_corrupt_and_written(tmp_path):
  assert baselines.load(str(tmp_path)) is None
  path = tmp_path / baselines.BASELINES_FILE
  path.write_text('{"constant_page": {"bleu": 0.1')
  with pytest.raises(records.DatasetError, match=str(path)) as e:
    baselines.load(str(tmp_path))
  assert len(str(e.value).splitlines()) == 1
  path.write_text('[1, 2]')
  with pytest.raises(records.DatasetError, match=str(path)):
    baselines.load(str(tmp_path))
  baselines.write(str(path), BASELINES)
  assert baselines.load(str(tmp_path)) == BASELINES
  assert json.loads(path.read_text()) == BASELINES
  assert [p.name for p in tmp_path.iterdir()] == [baselines.BASELINES_FILE]   # no temp file left
