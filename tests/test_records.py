"""phase1_jax.data.records: ArrayRecord shards round trip, a record's example in the synthetic
layout, and element labels within the scored window."""
from __future__ import annotations

import numpy as np
import pytest
from support import DTYPES, KEYS

from phase1_jax.data import records, synthetic, vocab


def random_record(rng, n_tokens, n_patches, feature_dim=16):
  return {'features': rng.standard_normal((n_patches, feature_dim)).astype(np.float16),
          'tokens': rng.integers(4, 300, n_tokens).astype(np.int32),
          'semantic_labels': rng.integers(-1, 50, n_tokens).astype(np.int8),
          'element_labels': (rng.random(30) < 0.3).astype(np.uint8),
          'source_id': f'page{rng.integers(1000)}.html'}


def test_record_round_trip_through_shards(tmp_path):
  rng = np.random.default_rng()
  written = [random_record(rng, int(rng.integers(1, 80)), int(rng.integers(1, 30)))
             for _ in range(7)]
  w = records.ShardWriter(str(tmp_path), 'train', records_per_shard=3)
  for r in written:
    w.write(r)
  w.close()
  assert w.shards == [f'train/train-0000{k}.array_record' for k in range(3)] and w.count == 7
  meta = {'format': records.FORMAT, 'version': records.VERSION,
          'splits': {'train': {'shards': w.shards}, 'val': {'shards': []}}}
  records.write_metadata(str(tmp_path), meta)
  src = records.FilePages(str(tmp_path), 'train', max_seq_len=40, num_patches=12)
  assert len(src) == 7
  for i in rng.permutation(7):   # random access, any order
    got = src.record(int(i))
    assert got['source_id'] == written[i]['source_id']
    for k in records.ARRAY_FIELDS:
      np.testing.assert_array_equal(got[k], written[i][k])
      assert got[k].dtype == written[i][k].dtype


@pytest.mark.parametrize('n_tokens,n_patches', [(5, 3), (39, 12), (60, 30)])
def test_example_matches_synthetic_layout(n_tokens, n_patches):
  rng = np.random.default_rng()
  rec = random_record(rng, n_tokens, n_patches)
  t, p = 40, 12
  ex = records.to_example(rec, max_seq_len=t, num_patches=p)
  syn = synthetic.SyntheticPages(synthetic.PageSpec(max_seq_len=t, grid_rows=4, grid_cols=3,
                                                    feature_dim=16), num_samples=1, seed=0)[0]
  assert set(ex) == set(KEYS)
  for k in KEYS:
    assert ex[k].shape == syn[k].shape and ex[k].dtype == DTYPES[k], k
  n = min(n_tokens, t - 1)
  assert ex['inputs'][0] == vocab.BOS_ID and ex['targets'][n] == vocab.EOS_ID
  np.testing.assert_array_equal(ex['targets'][:n], rec['tokens'][:n])
  np.testing.assert_array_equal(ex['inputs'][1:n + 1], rec['tokens'][:n])
  np.testing.assert_array_equal(ex['target_mask'], np.arange(t) <= n)
  np.testing.assert_array_equal(ex['semantic_mask'][:n], rec['semantic_labels'][:n] >= 0)
  assert not ex['semantic_mask'][n:].any()
  np.testing.assert_array_equal(ex['feature_mask'], np.arange(p) < min(n_patches, p))
  np.testing.assert_array_equal(ex['features'][:min(n_patches, p)],
                                rec['features'][:p].astype(np.float32))


def test_element_labels_follow_the_window_of_a_long_page(prepared):
  """A label holds only when its type's open tag is among the tokens the model is scored on."""
  _, out, meta, _, _ = prepared
  open_ids = np.array(meta['element_open_tag_ids'])
  cut = 0
  for t in (8, 24, 512):
    src = records.FilePages(out, 'train', max_seq_len=t, num_patches=4)
    for i in range(len(src)):
      rec, ex = src.record(i), src[i]
      window = rec['tokens'][:t - 1]
      np.testing.assert_array_equal(ex['element_labels'], np.isin(open_ids, window))
      cut += int(ex['element_labels'].sum() < rec['element_labels'].sum())
  assert cut > 0          # short windows do drop labels of this corpus
