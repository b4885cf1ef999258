"""phase1_jax.data.record_checks (through records' names): a damaged shard or dataset.json is
named in one line when the dataset is opened or the record read."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from support import REPO

from phase1_jax import config as config_lib
from phase1_jax import config_validation
from phase1_jax.data import pipeline, records


def copy_dataset(prepared, tmp_path):
  """A private copy of the prepared directory and the path of its second train shard."""
  out = str(tmp_path / 'data')
  shutil.copytree(prepared[1], out)
  return out, os.path.join(out, records.read_metadata(out)['splits']['train']['shards'][1])


@pytest.mark.parametrize('damage,words', [
    (lambda f, n: f.truncate(n // 2), 'not a readable ArrayRecord shard'),
    (lambda f, n: (f.seek(n // 2), f.write(b'\xa5' * 64)), 'not a readable ArrayRecord shard'),
    (lambda f, n: (f.seek(f.read().index(b'\0' * 64) // 2), f.write(b'\xa5' * 16)),
     r'record \d+ is corrupt \(Corrupted Riegeli')])
def test_damaged_shard_is_named_when_the_split_opens(prepared, tmp_path, damage, words):
  """Truncated, its footer overwritten, or a record garbled (the records fill the file's start):
  FilePages names the shard (and the record) when it is opened, before anything would compile."""
  out, shard = copy_dataset(prepared, tmp_path)
  with open(shard, 'r+b') as f:
    damage(f, os.path.getsize(shard))
  with pytest.raises(records.DatasetError, match=words) as info:
    records.FilePages(out, 'train', max_seq_len=48, num_patches=16)
  assert str(info.value).startswith(f'{shard}: ') and '\n' not in str(info.value)


def test_garbled_record_of_a_large_split_is_named_when_read(prepared, tmp_path, monkeypatch):
  """A split too large to read whole when opened checks each shard's first and last records; a
  garbled record between them is a DataError naming its shard and index when the loader reads
  it, in the main thread."""
  out, shard = copy_dataset(prepared, tmp_path)
  data = open(shard, 'rb').read()
  with open(shard, 'r+b') as f:
    f.seek(data.index(b'\0' * 64) // 2)      # inside the records (the footer is at the end)
    f.write(b'\xa5' * 16)
  with pytest.raises(records.DatasetError, match='corrupt'):
    records.check_shard(shard, every_record=True)
  monkeypatch.setattr(records, 'VERIFY_ALL_BYTES', 0)
  source = records.FilePages(out, 'train', max_seq_len=48, num_patches=16)
  with pytest.raises(pipeline.DataError, match=rf'^{shard}: record \d+ is corrupt \(Corrupted'):
    for _ in pipeline.train_iterator(source, batch_size=2, seed=0, epoch=0):
      pass


@pytest.mark.parametrize('edit,words', [
    (lambda m: [1, 2], 'holds a JSON list'), (lambda m: {**m, 'splits': None}, "no 'splits'"),
    (lambda m: {k: v for k, v in m.items() if k != 'splits'}, "no 'splits'"),
    (lambda m: {**m, 'splits': {'train': m['splits']['train']}}, 'splits.val'),
    (lambda m: {**m, 'vocab_size': 'many'}, "vocab_size 'many' is not a positive integer"),
    (lambda m: {k: v for k, v in m.items() if k != 'semantic_classes'}, "no 'semantic_classes'")])
def test_damaged_dataset_json_is_named_in_one_line(prepared, tmp_path, edit, words):
  out, _ = copy_dataset(prepared, tmp_path)
  with open(os.path.join(out, records.METADATA_FILE)) as f:
    meta = json.load(f)
  with open(os.path.join(out, records.METADATA_FILE), 'w') as f:
    json.dump(edit(meta), f)
  with pytest.raises(records.DatasetError, match=words) as info:
    records.read_metadata(out, complete=True)
  assert '\n' not in str(info.value)
  with pytest.raises(config_lib.ConfigError, match=words):
    config_validation.validate(files_config_unchecked(out))


def files_config_unchecked(out):
  """files_config without reading dataset.json (it may be damaged)."""
  config = config_lib.load_file(os.path.join(REPO, 'configs', 'tiny.py'))
  config.data.name, config.data.path = 'files', out
  return config
