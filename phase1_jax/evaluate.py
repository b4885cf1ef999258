"""Evaluate the best checkpoint of an experiment into evaluation_results.json.

  python -m phase1_jax.evaluate --config configs/small.py --workdir experiments/NAME
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from phase1_jax import config_validation
from phase1_jax.config import ConfigError
from phase1_jax.config_validation import parse_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config the run was trained with.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Experiment directory holding checkpoints/.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:  # Orbax logs every file operation at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    config_validation.validate(_CONFIG.value)
  except ConfigError as e:
    sys.exit(f'error: {e}')
  evaluate(_CONFIG.value, _WORKDIR.value)


def evaluate(config, workdir):
  """Evaluates a validated config's best checkpoint; the stack (JAX, Orbax: seconds to import)
  is imported only now, so a bad flag or config fails in a fraction of a second."""
  from phase1_jax.data.pipeline import DataError
  from phase1_jax.training.checkpoint import CheckpointError
  from phase1_jax.training.evaluation import evaluate_checkpoint, summary
  try:
    print(summary(evaluate_checkpoint(config, workdir, which='best')))
  except (ConfigError, CheckpointError, DataError,
          OSError) as e:  # user errors, an unwritable results file (faults.WriterError): one line
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
