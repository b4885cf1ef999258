"""phase1_jax.data.prepare: HTML folder -> prepared dataset (splits, skipped pages, records,
workers, sharded runs and merge, duplicates, token cap, user features, errors)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from support import FEATURE_DIM, write_corpus, write_features

from phase1_jax.data import assemble, bpe, html_labels, html_pages, prepare, records


def test_prepare_writes_splits_and_reports_skipped_pages(prepared):
  root, out, meta, pages, _ = prepared
  assert json.load(open(os.path.join(out, 'dataset.json'))) == meta
  s, n = meta['summary'], {k: v['num_records'] for k, v in meta['splits'].items()}
  assert s['pages_found'] == len(pages) and s['pages_skipped'] == 1
  assert s['skipped'] == [{'path': 'sub/empty.html', 'reason': 'empty file'}]
  assert n['train'] + n['val'] == s['pages_written'] == len(pages) - 1 and n['val'] >= 1
  assert all(len(v['shards']) == -(-n[k] // 4) for k, v in meta['splits'].items())
  assert s['tokens'] == sum(len(records.FilePages(out, k, max_seq_len=8, num_patches=1).record(i)
                                ['tokens']) for k in n for i in range(n[k]))
  assert sum(s['element_type_pages'].values()) > 0 and 'outside_sections' in s[
      'semantic_class_tokens']
  assert sorted(os.listdir(out)) == ['dataset.json', 'tokenizer.json', 'train', 'val']
  assert not os.path.exists(out + '.incomplete')
  assert meta['input'] == 'features' and meta['feature_dim'] == FEATURE_DIM
  assert meta['semantic_classes'] == list(html_labels.LANDMARK_CLASSES)


def test_records_match_the_pages(prepared):
  root, out, meta, pages, feats = prepared
  tok = bpe.load(os.path.join(out, records.TOKENIZER_FILE))
  seen = set()
  for split in ('train', 'val'):
    src = records.FilePages(out, split, max_seq_len=48, num_patches=16)
    for i in range(len(src)):
      rec = src.record(i)
      seen.add(rec['source_id'])
      page = html_pages.parse_page(pages[rec['source_id']].encode())
      enc = tok.encode(page.markup)
      np.testing.assert_array_equal(rec['tokens'], enc.ids)
      np.testing.assert_array_equal(
          rec['semantic_labels'], page.char_classes_N[[a for a, _ in enc.offsets]])
      assert sorted(np.flatnonzero(rec['element_labels'])) == page.element_types
      user = np.load(os.path.join(feats, os.path.splitext(rec['source_id'])[0] + '.npy'))
      np.testing.assert_array_equal(rec['features'], user.astype(np.float16))
      assert assemble.split_of(assemble.markup_hash(page.markup), 0.2) == split or split == 'val'
  assert seen == {p for p, h in pages.items() if h}


def test_prepare_errors_are_one_line_and_leave_no_output(tmp_path):
  (tmp_path / 'empty').mkdir()
  feats = dict(features_dir=str(tmp_path))
  cases = [(str(tmp_path / 'empty'), 'no .html/.htm files'), (str(tmp_path / 'nope'),
                                                                'not a directory')]
  for html_dir, words in cases:
    with pytest.raises(prepare.PrepareError, match=words) as info:
      prepare.prepare(html_dir, str(tmp_path / 'out'), progress=False, **feats)
    assert '\n' not in str(info.value) and html_dir in str(info.value)
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'a.html').write_text('   ')
  with pytest.raises(prepare.PrepareError, match='none of 1 pages.*a.html: empty file'):
    prepare.prepare(str(tmp_path / 'bad'), str(tmp_path / 'out2'), progress=False, **feats)
  assert not os.path.exists(tmp_path / 'out2') and not os.path.exists(tmp_path / 'out2.incomplete')
  with pytest.raises(prepare.PrepareError, match='--vocab_size'):
    prepare.prepare(str(tmp_path / 'bad'), str(tmp_path / 'o3'), vocab_size=60000, **feats)
  with pytest.raises(prepare.PrepareError, match='--out .*not empty'):
    prepare.prepare(str(tmp_path / 'bad'), str(tmp_path / 'bad' / 'a.html'), **feats)
  with pytest.raises(prepare.PrepareError, match='--render or --features_dir'):
    prepare.prepare(str(tmp_path / 'bad'), str(tmp_path / 'o4'))
  with pytest.raises(prepare.PrepareError, match='--shard_index 2'):
    prepare.prepare(str(tmp_path / 'bad'), str(tmp_path / 'o5'), num_shards=2, shard_index=2,
                    **feats)


def test_binary_files_are_skipped_with_their_reason(tmp_path):
  """Random bytes named .html: skipped as 'not text', not parsed into pages of junk tokens."""
  root, feats = tmp_path / 'html', tmp_path / 'feats'
  pages = write_corpus(str(root), n_pages=4, features=str(feats))
  rng = np.random.default_rng(0)
  (root / 'junk.html').write_bytes(rng.bytes(100_000))
  write_features(str(feats), {'junk.html': None}, rng)
  meta = prepare.prepare(str(root), str(tmp_path / 'out'), vocab_size=300, workers=1,
                         features_dir=str(feats), progress=False)
  skipped = {s['path']: s['reason'] for s in meta['summary']['skipped']}
  assert skipped == {'junk.html': 'not text: binary content (NUL bytes)',
                     'sub/empty.html': 'empty file'}
  assert meta['summary']['pages_written'] == len(pages) - 1


def test_failed_merge_leaves_the_parts_and_no_dataset(prepared, tmp_path, monkeypatch):
  """A merge that fails leaves OUT as it was (the parts, no dataset.json, no staging folder), and
  a failed part of a sharded run deletes what it wrote."""
  root, _, _, _, feats = prepared
  shared = str(tmp_path / 'sharded')
  for i in (0, 1):
    prepare.prepare(root, shared, vocab_size=320, features_dir=feats, progress=False,
                    num_shards=2, shard_index=i)
  parts = sorted(os.listdir(os.path.join(shared, prepare.PARTS_DIR)))

  def fail(*args, **kwargs):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(records.ShardWriter, 'write', fail)
  with pytest.raises(OSError):
    prepare.merge(shared, vocab_size=320, progress=False)
  assert sorted(os.listdir(shared)) == [prepare.PARTS_DIR]
  assert sorted(os.listdir(os.path.join(shared, prepare.PARTS_DIR))) == parts
  monkeypatch.setattr(prepare, '_converted', fail)
  with pytest.raises(OSError):
    prepare.prepare(root, shared, vocab_size=320, features_dir=feats, progress=False,
                    num_shards=2, shard_index=1)
  assert sorted(os.listdir(os.path.join(shared, prepare.PARTS_DIR))) == [
      p for p in parts if '00001' not in p]


def without_timing(meta):
  timing = ('pages_per_second', 'convert_seconds')
  return {**meta, 'summary': {k: v for k, v in meta['summary'].items() if k not in timing}}


def assert_same_records(dir_a, dir_b):
  """Both directories hold the same records in each split (in any order)."""
  for split in ('train', 'val'):
    a, b = ({r['source_id']: r for r in map(src.record, range(len(src)))}
            for src in (records.FilePages(d, split, max_seq_len=48, num_patches=16)
                        for d in (dir_a, dir_b)))
    assert sorted(a) == sorted(b)
    for page in a:
      for k in records.ARRAY_FIELDS:
        np.testing.assert_array_equal(a[page][k], b[page][k])


def test_parallel_workers_write_the_same_dataset(prepared, tmp_path):
  root, out, meta, _, feats = prepared
  again = prepare.prepare(root, str(tmp_path / 'par'), vocab_size=320, val_fraction=0.2,
                          workers=2, records_per_shard=4, progress=False, features_dir=feats)
  assert without_timing(again) == without_timing(meta)
  assert_same_records(out, str(tmp_path / 'par'))


def test_sharded_conversion_then_merge_equals_one_run(prepared, tmp_path):
  root, out, meta, _, feats = prepared
  shared = str(tmp_path / 'sharded')
  for i in (1, 0, 2):        # any order, as on separate machines
    assert prepare.prepare(root, shared, vocab_size=320, val_fraction=0.2, workers=1,
                           features_dir=feats, progress=False, num_shards=3, shard_index=i) is None
    if i == 0:
      with pytest.raises(prepare.PrepareError, match=r'parts \[2\] of 3 are not written'):
        prepare.merge(shared, vocab_size=320, val_fraction=0.2, records_per_shard=4)
  merged = prepare.merge(shared, vocab_size=320, val_fraction=0.2, records_per_shard=4,
                         progress=False)
  assert without_timing(merged)['splits'] == meta['splits']
  assert merged['summary']['skipped'] == meta['summary']['skipped']
  assert_same_records(out, shared)
  assert not os.path.exists(os.path.join(shared, prepare.PARTS_DIR))


def test_redirect_stubs_skipped_and_duplicates_share_a_split(tmp_path):
  root, feats = tmp_path / 'html', tmp_path / 'feats'
  page = '<body><main><h1>Title {}</h1><p>Some text</p></main></body>'
  pages = {f'copy{i}.html': page.format('same') for i in range(6)}
  pages.update({f'other{i}.html': page.format(i) for i in range(30)})
  pages['moved.html'] = ('<html><head><meta http-equiv="refresh" content="0; url=new.html">'
                         '</head><body>Redirecting to <a href="new.html">new</a></body></html>')
  for rel, html in pages.items():
    os.makedirs(root, exist_ok=True)
    (root / rel).write_text(html)
  write_features(str(feats), pages, np.random.default_rng())
  meta = prepare.prepare(str(root), str(tmp_path / 'out'), vocab_size=300, val_fraction=0.3,
                         workers=1, features_dir=str(feats), progress=False)
  s = meta['summary']
  assert s['skipped'] == [{'path': 'moved.html', 'reason': 'redirect stub (meta refresh to '
                                                           'new.html)'}]
  assert s['duplicate_pages'] == 5 and {d['same_as'] for d in s['duplicates']} == {'copy0.html'}
  sides = {}
  for split in ('train', 'val'):
    src = records.FilePages(str(tmp_path / 'out'), split, max_seq_len=8, num_patches=1)
    sides.update({src.record(i)['source_id']: split for i in range(len(src))})
  assert len({sides[f'copy{i}.html'] for i in range(6)}) == 1
  assert set(sides.values()) == {'train', 'val'}


def test_stored_tokens_are_capped_and_labels_follow_them(prepared, tmp_path):
  root, out, meta, pages, feats = prepared
  capped = prepare.prepare(root, str(tmp_path / 'cap'), vocab_size=320, val_fraction=0.2,
                           workers=1, features_dir=feats, progress=False, max_tokens=12)
  assert capped['summary']['pages_cut_at_max_tokens'] > 0
  tok = bpe.load(os.path.join(tmp_path / 'cap', records.TOKENIZER_FILE))
  open_ids = np.array(capped['element_open_tag_ids'])
  for split in ('train', 'val'):
    src = records.FilePages(str(tmp_path / 'cap'), split, max_seq_len=48, num_patches=16)
    for i in range(len(src)):
      rec = src.record(i)
      # The parse stops early too: memory per page stays bounded.
      page = html_pages.parse_page(pages[rec['source_id']].encode(),
                                   max_chars=12 * prepare.CHARS_PER_TOKEN_CAP)
      full = tok.encode(page.markup).ids
      np.testing.assert_array_equal(rec['tokens'], full[:12])
      np.testing.assert_array_equal(rec['element_labels'], np.isin(open_ids, full[:12]))


def test_user_features_by_file_name(tmp_path):
  root, feats = tmp_path / 'html', tmp_path / 'feats'
  pages = write_corpus(str(root), n_pages=5, seed=3)
  rng = np.random.default_rng()
  arrays = {}
  for rel in pages:
    if pages[rel] and rel != 'page0.html':     # page0 has no features: skipped, reported
      arrays[rel] = rng.standard_normal((int(rng.integers(2, 9)), 6)).astype(np.float32)
      os.makedirs(os.path.dirname(feats / rel), exist_ok=True)
      np.save(feats / (os.path.splitext(rel)[0] + '.npy'), arrays[rel])
  out = str(tmp_path / 'out')
  meta = prepare.prepare(str(root), out, vocab_size=300, features_dir=str(feats), workers=1,
                         progress=False)
  assert meta['feature_dim'] == 6 and meta['input'] == 'features'
  assert {x['path'] for x in meta['summary']['skipped']} == {'sub/empty.html', 'page0.html'}
  for split in ('train', 'val'):
    src = records.FilePages(out, split, max_seq_len=16, num_patches=8)
    for i in range(len(src)):
      rec = src.record(i)
      np.testing.assert_array_equal(rec['features'], arrays[rec['source_id']].astype(np.float16))
