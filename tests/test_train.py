"""`python -m phase1_jax.train` (phase1_jax/train.py): a bad or missing config override is one
line naming the field, and nothing is written."""
import os
import subprocess
import sys

from support import REPO


def run_cli(module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True,
                        cwd=REPO, timeout=300)


def test_cli_bad_override_is_one_line_naming_the_field(tmp_path):
  proc = run_cli('phase1_jax.train', '--config', 'configs/tiny.py', '--config.model.num_heads=3',
                 '--workdir', str(tmp_path / 'run'))
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert lines[-1] == 'error: config.model.num_heads=3: must divide model.d_model (32)', proc.stderr
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_cli_override_of_a_missing_field_is_one_line(tmp_path):
  """--config.a.b for a field the config lacks: one line naming it (with what replaced a retired
  one), not a traceback; nothing written."""
  for arg, want in (('--config.loss.vocab_chunk_size=2048',
                     'error: config.loss.vocab_chunk_size: no longer exists: use '
                     'loss.logits_chunk_pages'),
                    ('--config.model.attention.kindd=dense',
                     'error: config.model.attention.kindd: unknown field (did you mean '
                     'model.attention.kind?)')):
    proc = run_cli('phase1_jax.train', '--config', 'configs/tiny.py', arg,
                   '--workdir', str(tmp_path / 'run'))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(want), proc.stderr
  assert not os.path.exists(tmp_path / 'run')
