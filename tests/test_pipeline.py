"""phase1_jax.data.pipeline: the grain pipelines over synthetic pages and over a prepared 'files'
dataset (batches, order, resuming, evaluation padding, per-process slices, bad records)."""
from __future__ import annotations

import numpy as np
import pytest
from support import DTYPES, KEYS, files_config

from phase1_jax import config_validation, specs
from phase1_jax.config import base_config
from phase1_jax.data import pipeline, synthetic

SMALL_SPEC = synthetic.PageSpec(max_seq_len=24, num_semantic_classes=6, num_element_types=5,
                                grid_rows=4, grid_cols=2, feature_dim=4, max_sections=3)


N_PAGES, BATCH = 11, 3


def assert_pages_equal(a, b):
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope='module')
def small_source():
  return synthetic.SyntheticPages(SMALL_SPEC, num_samples=N_PAGES, seed=0)


@pytest.fixture(scope='module')
def index_of(small_source):
  """Identifies a page by its feature bytes (noise makes every page's features unique)."""
  table = {small_source[i]['features'].tobytes(): i for i in range(N_PAGES)}
  assert len(table) == N_PAGES
  return lambda features: table[np.ascontiguousarray(features).tobytes()]


def epoch_order(source, index_of, seed, epoch):
  batches = list(pipeline.train_iterator(source, batch_size=BATCH, seed=seed, epoch=epoch))
  return [[index_of(f) for f in b['features']] for b in batches], batches


def test_train_iterator_batches(small_source, index_of):
  order, batches = epoch_order(small_source, index_of, seed=0, epoch=0)
  assert len(batches) == pipeline.steps_per_epoch(small_source, BATCH) == N_PAGES // BATCH
  p, t = SMALL_SPEC.grid_rows * SMALL_SPEC.grid_cols, SMALL_SPEC.max_seq_len
  shapes = {'features': (BATCH, p, SMALL_SPEC.feature_dim), 'feature_mask': (BATCH, p),
            'inputs': (BATCH, t), 'targets': (BATCH, t), 'target_mask': (BATCH, t),
            'semantic_labels': (BATCH, t), 'semantic_mask': (BATCH, t),
            'element_labels': (BATCH, SMALL_SPEC.num_element_types)}
  for b in batches:
    assert {k: v.shape for k, v in b.items()} == shapes
    assert all(b[k].dtype == DTYPES[k] for k in KEYS)
  # Rows are the source's pages, unchanged.
  for row, i in enumerate(order[0]):
    assert_pages_equal({k: v[row] for k, v in batches[0].items()}, small_source[i])
  # Every page at most once; exactly once apart from the dropped remainder.
  seen = [i for b in order for i in b]
  assert len(seen) == len(set(seen)) == (N_PAGES // BATCH) * BATCH
  assert set(seen) <= set(range(N_PAGES))


def test_train_order_depends_on_seed_and_epoch(small_source, index_of):
  order = epoch_order(small_source, index_of, seed=0, epoch=0)[0]
  assert epoch_order(small_source, index_of, seed=0, epoch=0)[0] == order
  orders = [epoch_order(small_source, index_of, seed=0, epoch=e)[0] for e in (1, 2)]
  orders.append(epoch_order(small_source, index_of, seed=1, epoch=0)[0])
  for other in orders:
    assert other != order
  assert orders[0] != orders[1]
  # Across epochs every page does get seen.
  seen = {i for o in [order, *orders] for b in o for i in b}
  assert seen == set(range(N_PAGES))
  # Shuffled, not in source order.
  assert [i for b in order for i in b] != list(range((N_PAGES // BATCH) * BATCH))


def test_train_iterator_resumes_mid_epoch(small_source):
  it = pipeline.train_iterator(small_source, batch_size=BATCH, seed=4, epoch=2)
  next(it)
  state = it.get_state()
  expected = next(it)
  rest = list(it)
  resumed = pipeline.train_iterator(small_source, batch_size=BATCH, seed=4, epoch=2)
  resumed.set_state(state)
  assert_pages_equal(next(resumed), expected)
  remaining = list(resumed)
  assert len(remaining) == len(rest)
  for a, b in zip(remaining, rest):
    assert_pages_equal(a, b)


@pytest.mark.parametrize('limit', [None, 7, 8])
def test_eval_batches_pad_last_batch(small_source, index_of, limit):
  n = N_PAGES if limit is None else limit
  batches = list(pipeline.eval_batches(small_source, batch_size=4, limit=limit))
  assert len(batches) == -(-n // 4)
  seen = []
  for batch, real in batches:
    assert set(batch) == set(KEYS) | {'page_mask'}
    assert all(v.shape[0] == 4 for v in batch.values())
    np.testing.assert_array_equal(batch['page_mask'], np.arange(4) < real)
    assert batch['page_mask'].dtype == np.bool_
    ids = [index_of(f) for f in batch['features']]
    seen += ids[:real]
    # Padding rows repeat the last real page.
    assert all(i == ids[real - 1] for i in ids[real:])
  assert [r for _, r in batches] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
  assert seen == list(range(n))   # in order, each page exactly once


def test_make_source_from_config():
  config = base_config()
  config.data.val_samples = 7
  config.data.max_seq_len = 40
  config.model.num_element_types = 12
  checked = pipeline.make_source(specs.data_spec(config), 'val')
  assert isinstance(checked, pipeline.CheckedSource) and checked.name == 'synthetic val split'
  src = checked.source
  assert len(src) == 7 and src.split == 'val' and src.seed == config.data.seed
  assert src.spec.max_seq_len == 40 and src.spec.num_element_types == 12
  assert src.spec.grid_rows * src.spec.grid_cols == src[0]['features'].shape[0]
  assert len(pipeline.make_source(specs.data_spec(config), 'train')) == config.data.train_samples


class _OneBadRecord:
  """Pages of `pages`, except that record `bad` has `fault` applied."""

  def __init__(self, pages, bad, fault):
    self.pages, self.bad, self.fault = pages, bad, fault

  def __len__(self):
    return len(self.pages)

  def __getitem__(self, i):
    return self.fault(self.pages[i]) if i == self.bad else self.pages[i]


@pytest.mark.parametrize('fault,match', [
    (lambda r: {**r, 'features': r['features'][:, :-1]}, r'features is float32\[\d+, \d+\]'),
    (lambda r: {**r, 'inputs': r['inputs'].astype(np.int64)}, r'inputs is int64'),
    (lambda r: {k: v for k, v in r.items() if k != 'targets'}, r'record lacks targets'),
    (lambda r: [r], r'record is a list, not a dict'),
])
def test_malformed_record_names_source_and_index(fault, match):
  """A bad record anywhere in an epoch is reported as '<source>[<index>]: <what>', through
  grain's threaded prefetching, before it reaches a batch."""
  config = base_config()
  config.data.train_samples = 24
  good = pipeline.make_source(specs.data_spec(config), 'train')
  bad = int(np.random.default_rng().integers(24))
  src = pipeline.CheckedSource(_OneBadRecord(good.source, bad, fault), 'pages.bin', good.fields)
  with pytest.raises(pipeline.DataError, match=rf'^pages\.bin\[{bad}\]: {match}'):
    list(pipeline.train_iterator(src, batch_size=4, seed=1, epoch=0))
  assert len(list(pipeline.train_iterator(good, batch_size=4, seed=1, epoch=0))) == 6


# ------------------------------------------------------------------------- prepared pages

def test_each_process_reads_its_slice_of_every_global_batch(prepared):
  """Two processes each yield half of every global batch of 4; together they are the global
  batches of one process, page for page (as sets per batch)."""
  config = files_config(prepared[1])
  source = pipeline.make_source(specs.data_spec(config), 'train')
  rows = lambda batch: sorted(tuple(t) for t in batch['targets'])
  whole = [rows(b) for b in pipeline.train_iterator(source, batch_size=4, seed=2, epoch=1)]
  halves = [list(pipeline.train_iterator(source, batch_size=4, seed=2, epoch=1, shard_index=i,
                                         shard_count=2)) for i in (0, 1)]
  assert len(whole) == pipeline.steps_per_epoch(source, 4) == len(source) // 4 >= 2
  assert [len(h) for h in halves] == [len(whole)] * 2
  for k, batch in enumerate(whole):
    assert all(len(h[k]['targets']) == 2 for h in halves)
    assert sorted(rows(halves[0][k]) + rows(halves[1][k])) == batch


def test_files_source_through_the_pipeline(prepared):
  _, out, meta, _, _ = prepared
  config = files_config(out)
  config_validation.validate(config)
  train = pipeline.make_source(specs.data_spec(config), 'train')
  assert len(train) == meta['splits']['train']['num_records']
  assert (pipeline.element_open_tag_ids(specs.data_spec(config))
          == tuple(meta['element_open_tag_ids']))
  batches = list(pipeline.train_iterator(train, batch_size=4, seed=0, epoch=0))
  assert len(batches) == pipeline.steps_per_epoch(train, 4) == len(train) // 4
  t, p = config.data.max_seq_len, config.data.grid_rows * config.data.grid_cols
  for b in batches:
    assert {k: v.shape[1:] for k, v in b.items()} == {
        'features': (p, 16), 'feature_mask': (p,), 'inputs': (t,), 'targets': (t,),
        'target_mask': (t,), 'semantic_labels': (t,), 'semantic_mask': (t,),
        'element_labels': (len(meta['element_types']),)}
    assert all(b[k].dtype == DTYPES[k] for k in KEYS)
  it = pipeline.train_iterator(train, batch_size=2, seed=1, epoch=0)
  next(it)
  state, expected = it.get_state(), next(it)
  again = pipeline.train_iterator(train, batch_size=2, seed=1, epoch=0)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)['targets'], expected['targets'])
