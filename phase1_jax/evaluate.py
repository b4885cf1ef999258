"""Evaluate the best checkpoint of an experiment into evaluation_results.json.

  python -m phase1_jax.evaluate --config configs/small.py --workdir experiments/NAME
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from phase1_jax.config import ConfigError
from phase1_jax.config_validation import parse_flags
from phase1_jax.data.pipeline import DataError
from phase1_jax.training.checkpoint import CheckpointError
from phase1_jax.training.evaluation import evaluate_checkpoint

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config the run was trained with.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Experiment directory holding checkpoints/.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:  # Orbax logs every file operation at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, which='best')
  except (ConfigError, CheckpointError, DataError, FileNotFoundError) as e:  # user errors: one line
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
