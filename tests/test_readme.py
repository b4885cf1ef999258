"""The README's commands as written: every `python -m phase1_jax...` command in its bash blocks
names flags its CLI accepts, and every `--config.a.b` override in the README and docs/ names a field
of the config (so the docs cannot drift from the code)."""
from __future__ import annotations

import functools
import re
import subprocess
import sys

import pytest
from support import REPO

from phase1_jax import config as config_lib


def _readme_commands() -> list[tuple[str, list[str]]]:
  """(module, flag names) of each `python -m phase1_jax...` command in README's bash blocks."""
  text = (REPO / 'README.md').read_text()
  commands = []
  for block in re.findall(r'```bash\n(.*?)```', text, re.S):
    for line in block.replace('\\\n', ' ').splitlines():
      for command in line.split('&&'):
        match = re.match(r'\s*python -m (phase1_jax[\w.]*)(.*)', command.split('#')[0])
        if match:
          flags = re.findall(r'(?<![\w-])--([a-z_]+)', match.group(2))
          commands.append((match.group(1), flags))
  return commands


@functools.cache
def _help(module: str) -> str:
  done = subprocess.run([sys.executable, '-m', module, '--help'], capture_output=True, text=True,
                        timeout=120, cwd=REPO)
  assert done.returncode == 0, f'{module} --help: {done.stderr[-2000:]}'
  return done.stdout + done.stderr


@pytest.mark.parametrize('module,flags', _readme_commands(),
                         ids=lambda v: v if isinstance(v, str) else ' '.join(v))
def test_readme_command_flags_exist(module, flags):
  text = _help(module)
  for flag in flags:
    assert re.search(rf'--(\[no\])?{flag}\b', text), f'{module}: --{flag} is not among its flags'


def test_documented_config_overrides_name_config_fields():
  fields = set(config_lib.flatten(config_lib.base_config().to_dict()))
  pages = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
  unknown = []
  for page in pages:
    for path in re.findall(r'--config\.([a-z_][\w.]*[a-z_\d])', page.read_text()):
      if path not in fields and path != 'FIELD':
        unknown.append(f'{page.name}: --config.{path}')
  assert not unknown, unknown
