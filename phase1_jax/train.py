"""Train the Phase 1 decoder.

  python -m phase1_jax.train --config configs/small.py [--config.train.batch_size=8] [--workdir DIR]

Exit status: 0 done, 1 error (one line on stderr), 75 stopped by SIGTERM/SIGINT after saving a
checkpoint (run the same command to resume), 130 stopped by a second SIGINT without saving.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from phase1_jax import config_validation
from phase1_jax.config import ConfigError
from phase1_jax.training import faults

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
    config_validation.validate(_CONFIG.value)
  except ConfigError as e:
    sys.exit(f'error: {e}')
  train(_CONFIG.value, _WORKDIR.value)


def train(config, workdir):
  """Trains a validated config. The training stack (JAX, Orbax, grain: seconds to import) is
  imported only now, so a bad flag or config fails in a fraction of a second."""
  from phase1_jax import specs
  from phase1_jax.data.pipeline import DataError
  from phase1_jax.training import host
  from phase1_jax.training.checkpoint import CheckpointError
  from phase1_jax.training.loop import train_and_evaluate
  try:
    host.prepare(specs.host_spec(config))   # before anything starts JAX's backends
    train_and_evaluate(config, workdir, validated=True)
  except faults.Preempted as e:  # checkpoint committed; a distinct status says "resubmit me"
    print(f'preempted: {e}', file=sys.stderr)
    sys.exit(faults.PREEMPTED_EXIT_CODE)
  except (ConfigError, CheckpointError, DataError, faults.NonFiniteError,
          OSError) as e:  # user errors and run faults (full disk, lost workdir...): one line
    sys.exit(f'error: {e}')
  except KeyboardInterrupt:  # a second Ctrl-C outside a save: no new checkpoint
    print('interrupted: stopped without saving; the last committed checkpoint is kept. Run the '
          'same command again to resume from it.', file=sys.stderr)
    sys.exit(faults.INTERRUPTED_EXIT_CODE)


if __name__ == '__main__':
  app.run(main, flags_parser=config_validation.parse_flags)
