"""Tests for phase1_jax.training.reporting (no tensorboard dependency)."""

import contextlib
import json
import os
import resource
import signal
import struct
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX import SummaryWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.record_writer import masked_crc32c

from phase1_jax.training import faults, history
from phase1_jax.training.reporting import Reporter, epoch_summary, progress_bar, to_jsonable


def event_files(workdir):
  tb = os.path.join(workdir, 'tensorboard')
  return sorted(os.path.join(tb, f) for f in os.listdir(tb) if 'tfevents' in f)


def read_events(path):
  """Parses a TFRecord event file: [len u64][crc u32][data][crc u32]..., checking both CRCs and
  that the file ends on a whole record."""
  with open(path, 'rb') as f:
    data = f.read()
  events, pos = [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack('<Q', header)
    body = data[pos + 12:pos + 12 + length]
    assert struct.unpack('<I', data[pos + 8:pos + 12])[0] == masked_crc32c(header)
    assert struct.unpack('<I', data[pos + 12 + length:pos + 16 + length])[0] == (
        masked_crc32c(body))
    events.append(Event.FromString(body))
    pos += 12 + length + 4
  assert pos == len(data), f'{path} ends in a partial record'
  return events


def scalar_points(paths):
  return [(v.tag, e.step, round(v.simple_value, 6))
          for p in paths
          for e in read_events(p)
          for v in e.summary.value
          if v.HasField('simple_value')]


@contextlib.contextmanager
def file_size_limit(nbytes):
  """Files of this process may not grow past `nbytes`: writes fail with EFBIG (SIGXFSZ ignored),
  as `ulimit -f` makes them, and like a full disk. Keep jax (its compilation cache) out of it."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def test_scalars_and_histograms_on_disk(tmp_path):
  rep = Reporter(tmp_path)
  rep.scalars(1, {'loss': np.float32(2.5), 'acc': jnp.array(0.25)}, prefix='train/')
  params = {
      'layers': {
          '0': {
              'kernel': np.arange(6.0).reshape(2, 3),
              'bias': jnp.zeros(3)
          }
      },
      'rng': np.zeros(2, np.uint32)
  }
  rep.histograms(1, params)
  (first,) = event_files(tmp_path)
  with open(first, 'rb') as f:   # each call's events reach the file at once (fsync at flush)
    raw = f.read()
  assert raw and b'train/loss' in raw and b'params/layers/0/kernel' in raw
  rep.flush()
  rep.scalars(2, {'loss': 1.5}, prefix='train/')  # the same file goes on
  rep.close()
  assert event_files(tmp_path) == [first] and os.path.getsize(first) > len(raw)
  assert scalar_points([first]) == [('train/loss', 1, 2.5), ('train/acc', 1, 0.25),
                                    ('train/loss', 2, 1.5)]
  hist_tags = {v.tag for e in read_events(first) for v in e.summary.value if v.HasField('histo')}
  assert hist_tags == {'params/layers/0/kernel', 'params/layers/0/bias', 'params/rng'}
  rep.scalars(3, {'loss': 1.0})   # after close: a new, unique file
  rep.close()
  assert len(event_files(tmp_path)) == 2


def test_events_are_those_summary_writer_writes(tmp_path):
  """The synchronous writer's events equal tensorboardX's SummaryWriter's (wall times aside):
  the file version, the purge marker, scalars and default-bin histograms."""
  values = np.random.default_rng(0).standard_normal(300)
  with Reporter(tmp_path / 'ours', start_step=4) as rep:
    rep.scalars(5, {'loss': 1.25, 'lr': np.float32(3e-4)}, prefix='train/')
    rep.histograms(6, {'w': values})
  with SummaryWriter(str(tmp_path / 'theirs'), purge_step=5) as writer:
    writer.add_scalar('train/loss', 1.25, 5)
    writer.add_scalar('train/lr', float(np.float32(3e-4)), 5)
    writer.add_histogram('params/w', values, 6)

  def events(directory):
    (path,) = [os.path.join(directory, f) for f in os.listdir(directory)]
    return [e.SerializeToString() for e in read_events(path) if not e.ClearField('wall_time')]
  ours = events(tmp_path / 'ours' / 'tensorboard')
  assert ours == events(tmp_path / 'theirs') and len(ours) == 6


def test_event_write_error_is_one_line_and_keeps_whole_calls(tmp_path):
  """A write that fails (EFBIG here, as with ENOSPC) raises WriterError naming the file at once;
  the file is cut back to its last whole call and reads to its end; the next call opens a new
  file. No thread is involved, so nothing can hang."""
  rep = Reporter(tmp_path)
  rep.scalars(1, {'loss': 2.0})
  (path,) = event_files(tmp_path)
  size = os.path.getsize(path)
  big = {'w': np.random.default_rng(0).standard_normal(100_000)}   # ~30 kB of histogram
  start = time.monotonic()
  with file_size_limit(size + 2_000), pytest.raises(faults.WriterError) as e:
    rep.histograms(2, big)
  assert time.monotonic() - start < 5
  assert str(e.value) == f'{path}: cannot write TensorBoard events (File too large)'
  assert isinstance(e.value, OSError)   # train.py's one-line handler catches it
  assert os.path.getsize(path) == size and scalar_points([path]) == [('loss', 1, 2.0)]
  rep.scalars(2, {'loss': 1.0})   # the limit is gone: a new file
  rep.close()
  assert len(event_files(tmp_path)) == 2


def test_flush_error_raises_and_close_after_error_is_quiet(tmp_path, monkeypatch):
  rep = Reporter(tmp_path)
  rep.scalars(1, {'loss': 2.0})

  def no_space(fd):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(os, 'fsync', no_space)
  with pytest.raises(faults.WriterError, match=r'tfevents.*: cannot write TensorBoard events '
                     r'\(No space left on device\)$'):
    rep.flush()
  rep.close()   # nothing left to close


def test_history_write_error_names_the_file_and_keeps_it(tmp_path):
  rep = Reporter(tmp_path)
  rep.history({'step': 1, 'note': 'x' * 100})
  path = tmp_path / 'training_history.jsonl'
  before = path.read_text()
  with file_size_limit(len(before) + 500), pytest.raises(faults.WriterError) as e:
    rep.history({'step': 2, 'note': 'x' * 2_000})
  assert str(e.value) == f'{path}: cannot write (File too large)'
  assert path.read_text() == before   # the part that fitted is cut off again
  assert sorted(os.listdir(tmp_path)) == ['tensorboard', 'training_history.jsonl']
  rep.history({'step': 2})   # the failed record is not in the file either
  assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [1, 2]
  rep.close()
  assert [r['step'] for r in json.loads((tmp_path / 'training_history.json').read_text())] == [1, 2]


def test_history_is_appended_line_by_line_and_listed_at_epoch_ends(tmp_path, monkeypatch):
  """A record costs one appended line, whatever the history's length: the JSON list is written
  only by write_history() (epoch ends) and close()."""
  rep = Reporter(tmp_path)
  writes = []
  monkeypatch.setattr(history, 'atomic_write_json', lambda path, obj: writes.append(len(obj)))
  for step in range(1, 201):
    rep.history({'kind': 'train', 'step': step})
  assert writes == [] and not (tmp_path / 'training_history.json').exists()
  assert len((tmp_path / 'training_history.jsonl').read_text().splitlines()) == 200
  rep.write_history()
  rep.close()
  assert writes == [200, 200]


def test_history_log_cut_by_a_kill_loses_only_its_last_line(tmp_path):
  with Reporter(tmp_path) as rep:
    for step in (1, 2):
      rep.history({'step': step})
  log = tmp_path / 'training_history.jsonl'
  log.write_text(log.read_text() + '{"step": 3, "lo')   # killed while writing step 3
  with Reporter(tmp_path, start_step=2) as rep:
    rep.history({'step': 3})
  assert [json.loads(line)['step'] for line in log.read_text().splitlines()] == [1, 2, 3]
  assert [r['step'] for r in json.loads((tmp_path / 'training_history.json').read_text())] == [
      1, 2, 3]
  log.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(faults.WorkdirError, match=r'training_history.jsonl: cannot read the '
                     r'training history \(line 2 is not valid JSON'):
    Reporter(tmp_path, start_step=3)


def test_resume_marks_purge_step(tmp_path):
  with Reporter(tmp_path) as rep:
    for step in range(1, 5):
      rep.scalars(step, {'loss': step}, prefix='train/')
  with Reporter(tmp_path, start_step=2) as rep:
    for step in (3, 4):
      rep.scalars(step, {'loss': 10 * step}, prefix='train/')
  old, new = event_files(tmp_path)  # the first file survived the reopen
  assert [p[1] for p in scalar_points([old])] == [1, 2, 3, 4]
  starts = [
      e.step
      for e in read_events(new)
      if e.HasField('session_log') and e.session_log.status == SessionLog.START
  ]
  assert starts == [3]  # TensorBoard drops older events at steps >= 3: step 2 is kept
  assert scalar_points([new]) == [('train/loss', 3, 30.0), ('train/loss', 4, 40.0)]


def test_restart_before_any_checkpoint_purges_too(tmp_path):
  with Reporter(tmp_path) as rep:   # killed before its first checkpoint: step 0 again
    rep.scalars(1, {'loss': 1.0})
  assert not [e for e in read_events(event_files(tmp_path)[0]) if e.HasField('session_log')]
  with Reporter(tmp_path, start_step=0) as rep:
    rep.scalars(1, {'loss': 2.0})
  starts = [e.step for e in read_events(event_files(tmp_path)[1]) if e.HasField('session_log')
            and e.session_log.status == SessionLog.START]
  assert starts == [1]


def test_history_append_and_resume_truncation(tmp_path):
  with Reporter(tmp_path) as rep:
    for step in (100, 200, 300):
      rep.history({'epoch': step // 100, 'step': step, 'val_loss': np.float32(1.0 / step)})
    rep.history({'note': 'no step key'})
  path = tmp_path / 'training_history.json'
  records = json.loads(path.read_text())
  assert [r.get('step') for r in records] == [100, 200, 300, None]
  assert isinstance(records[0]['val_loss'], float)

  with Reporter(tmp_path, start_step=200) as rep:  # resumed from step 200
    assert [r.get('step') for r in json.loads(path.read_text())] == [100, 200, None]
    rep.history({'epoch': 3, 'step': jnp.array(300)})
  assert [r.get('step') for r in json.loads(path.read_text())] == [100, 200, None, 300]
  log = (tmp_path / 'training_history.jsonl').read_text().splitlines()
  assert [json.loads(line).get('step') for line in log] == [100, 200, None, 300]
  assert not [p for p in os.listdir(tmp_path) if '.tmp' in p]


def test_run_with_only_a_json_history_resumes_from_it(tmp_path):
  (tmp_path / 'training_history.json').write_text('[{"step": 1}, {"step": 5}]')
  with Reporter(tmp_path, start_step=1) as rep:
    rep.history({'step': 2})
  log = (tmp_path / 'training_history.jsonl').read_text().splitlines()
  assert [json.loads(line)['step'] for line in log] == [1, 2]


@pytest.mark.parametrize('content,problem', [
    (b'{"not": "a list"}', 'expected a JSON list of record objects'),
    (b'[{"step": 2},', 'not valid JSON: Expecting value'),
    (b'\xff\xfe junk', "not valid JSON: 'utf-8' codec can't decode"),
])
def test_history_unreadable_is_one_line_and_left_untouched(tmp_path, content, problem):
  """A garbled history stops a resume with one line naming it and what to do; the file stays
  as it was (the user decides), and nothing else is written."""
  path = tmp_path / 'training_history.json'
  path.write_bytes(content)
  with pytest.raises(faults.WorkdirError) as e:
    Reporter(tmp_path, start_step=8)
  message = str(e.value)
  assert message.startswith(f'{path}: cannot read the training history ({problem}')
  assert message.endswith('move it aside (e.g. to training_history.json.corrupt) to resume '
                          'without its records') and '\n' not in message
  assert path.read_bytes() == content and os.listdir(tmp_path) == ['training_history.json']


def test_write_json_atomic_and_numpy_safe(tmp_path):
  rep = Reporter(tmp_path)
  obj = {
      'f32': np.float32(1.5),
      'i64': np.int64(2),
      'arr': jnp.arange(3),
      'nan': float('nan'),
      'pair': (1, np.bool_(True)),
      3: 'int key'
  }
  rep.write_json('eval/metrics.json', obj)
  out = tmp_path / 'eval' / 'metrics.json'
  assert json.loads(out.read_text()) == {
      'f32': 1.5,
      'i64': 2,
      'arr': [0, 1, 2],
      'nan': None,
      'pair': [1, True],
      '3': 'int key'
  }
  before = out.read_text()
  with pytest.raises(TypeError, match='object'):
    rep.write_json('eval/metrics.json', {'bad': object()})
  assert out.read_text() == before  # a failed write leaves the old file intact
  assert os.listdir(out.parent) == ['metrics.json']
  with pytest.raises(ValueError, match='relative'):
    rep.write_json('../escape.json', {})
  rep.close()
  assert to_jsonable([np.float16(0.5), np.array([[1, 2]])]) == [0.5, [[1, 2]]]


def test_epoch_summary_format():
  metrics = {
      'train_loss': 3.45671,
      'val_loss': np.float32(3.2134),
      'element_f1': 0.2345,
      'semantic_accuracy': 0.9,
      'bleu': 0.31,
      'ignored': 1.0
  }
  assert epoch_summary(
      1, 2, metrics) == ('Epoch 1/2  Train Loss: 3.4567  Val Loss: 3.2134  Element F1: 0.2345  '
                         'Semantic Acc: 0.9000  BLEU: 0.3100')
  assert epoch_summary(3, 10, {'train_loss': 1}) == 'Epoch 3/10  Train Loss: 1.0000'


def test_non_main_process_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  with Reporter(workdir, start_step=5, is_main_process=False) as rep:
    rep.scalars(1, {'loss': 1.0})
    rep.histograms(1, {'w': np.ones(3)})
    rep.history({'step': 1})
    rep.write_json('x.json', {'a': 1})
    rep.flush()
  assert not workdir.exists()


def test_progress_bar_postfix(capsys, monkeypatch):
  monkeypatch.setattr(sys.stderr, 'isatty', lambda: True)
  with progress_bar(3, desc='Epoch 1') as bar:
    for i in range(3):
      bar.set_postfix(loss=f'{1.0 / (i + 1):.4f}', refresh=False)
      bar.update(1)
  assert bar.n == 3 and 'loss=0.3333' in str(bar)
  assert 'Epoch 1' in capsys.readouterr().err
  with progress_bar(3, desc='quiet', disable=True) as bar:
    bar.update(1)
  assert capsys.readouterr().err == ''


def test_progress_bar_only_on_a_terminal(capsys, monkeypatch):
  """stderr to a file or a pipe: no bar, whose carriage returns would glue the next line (an
  `error: ...`) onto its residue."""
  monkeypatch.setattr(sys.stderr, 'isatty', lambda: False)
  with progress_bar(3, desc='Epoch 1') as bar:
    bar.update(1)
  assert capsys.readouterr().err == ''
