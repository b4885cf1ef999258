"""phase1_jax.training.faults: signal flags, the non-finite budget, workdir checks (no jax)."""
import signal

import pytest

from phase1_jax.training import faults


def test_stop_signals_flag_then_restore_handlers():
  before = {s: signal.getsignal(s) for s in faults.STOP_SIGNALS}
  with faults.StopSignals() as stop:
    assert stop.requested is None
    signal.raise_signal(signal.SIGTERM)   # would end the process without the handler
    assert stop.requested == 'SIGTERM'
    signal.raise_signal(signal.SIGTERM)   # repeated: still a request, not an interrupt
    assert stop.requested == 'SIGTERM'
  assert {s: signal.getsignal(s) for s in faults.STOP_SIGNALS} == before


def test_second_sigint_interrupts_at_once():
  with faults.StopSignals() as stop:
    signal.raise_signal(signal.SIGINT)
    assert stop.requested == 'SIGINT'
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)


def test_only_the_given_signals_are_taken():
  before = signal.getsignal(signal.SIGTERM)
  with faults.StopSignals((signal.SIGINT,)):
    assert signal.getsignal(signal.SIGTERM) is before


def test_nonfinite_counter_resets_and_stops_at_limit():
  counter = faults.NonFiniteCounter(3, consecutive=1, total=4)   # as restored from a checkpoint
  counter.update(10, True)
  counter.update(11, False)
  assert counter.state() == {'consecutive': 0, 'total': 5}
  counter.update(12, True)
  counter.update(13, True)
  with pytest.raises(faults.NonFiniteError, match=r'^step 14: 3 consecutive steps .*'
                     r'max_consecutive_nonfinite=3'):
    counter.update(14, True)
  assert counter.state() == {'consecutive': 3, 'total': 8}


def test_prepare_workdir(tmp_path):
  faults.prepare_workdir(str(tmp_path / 'a' / 'b'))
  assert list((tmp_path / 'a' / 'b').iterdir()) == []   # the probe file is gone
  (tmp_path / 'f').write_text('')
  with pytest.raises(faults.WorkdirError, match=rf'^{tmp_path}/f/x: workdir is not writable'):
    faults.prepare_workdir(str(tmp_path / 'f' / 'x'))
