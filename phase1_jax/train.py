"""Train the Phase 1 decoder.

  python -m phase1_jax.train --config configs/small.py [--config.train.batch_size=8] [--workdir DIR]
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from phase1_jax.config import ConfigError
from phase1_jax.training.checkpoint import CheckpointError
from phase1_jax.training.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Experiment directory; resumes from its '
                               'checkpoints. Default: experiments/<exp_name>_<timestamp>.')
flags.mark_flag_as_required('config')


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:  # Orbax logs every file operation at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, CheckpointError, FileNotFoundError) as e:  # user errors: one line
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
