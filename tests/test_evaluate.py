"""`python -m phase1_jax.evaluate` (phase1_jax/evaluate.py): one-line error without checkpoints,
and a run's own config.json with flag overrides."""
import json
import os
import subprocess
import sys

from support import REPO


def run_cli(module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True,
                        cwd=REPO, timeout=300)


def test_cli_evaluate_without_checkpoints_is_one_line(tmp_path):
  proc = run_cli('phase1_jax.evaluate', '--config', 'configs/tiny.py', '--workdir', str(tmp_path))
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and str(tmp_path) in last and 'checkpoints' in last, proc.stderr


def test_cli_evaluate_reads_the_runs_config_and_prints_the_targets(tiny_run, tmp_path):
  """evaluate --workdir alone: the run's config.json, a flag override, the targets line printed
  and evaluation_results.json written."""
  import shutil
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_run, workdir)
  os.remove(os.path.join(workdir, 'evaluation_results.json'))
  proc = run_cli('phase1_jax.evaluate', '--workdir', workdir, '--bleu_samples', '4')
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith('Best checkpoint (step '), proc.stdout
  assert 'bleu=' in proc.stdout and 'target 0.3' in proc.stdout
  with open(os.path.join(workdir, 'evaluation_results.json')) as f:
    assert json.load(f)['metrics']['generated_pages'] == 4
