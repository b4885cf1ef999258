"""Evaluate a run's best checkpoint on the val split: prints the metrics against the targets (and
beside the dataset's baselines, when it has them) and writes evaluation_results.json.

  python -m phase1_jax.evaluate --workdir experiments/NAME [--bleu_samples N]
      [--render_samples N] [--strategy greedy|mbr] [--candidates 8] [--temperature T]
      [--checkpoint best|latest]

The run's config comes from <workdir>/config.json; the flags override its `eval` and `decode`
sections (`--config path` instead reads a config file, with `--config.*` overrides).
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from phase1_jax import config_validation
from phase1_jax.config import ConfigError
from phase1_jax.config_validation import parse_flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'Experiment directory (checkpoints/, config.json).')
_CONFIG = config_flags.DEFINE_config_file('config', None, "Config file; default: the workdir's "
                                          'config.json.', lock_config=False)
_CHECKPOINT = flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint.')
_EVAL = {
    'bleu_samples': flags.DEFINE_integer('bleu_samples', None, 'Val pages decoded.'),
    'render_samples': flags.DEFINE_integer('render_samples', None, 'Of those, pages rendered and '
                                           'scored with the visual metrics (0: off).'),
}
_DECODE = {
    'strategy': flags.DEFINE_enum('strategy', None, ['greedy', 'sample', 'beam', 'mbr'],
                                  'How the val pages are decoded.'),
    'candidates': flags.DEFINE_integer('candidates', None, 'mbr: pages decoded, one kept.'),
    'temperature': flags.DEFINE_float('temperature', None, 'Sampling temperature.'),
}
flags.mark_flag_as_required('workdir')


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:  # Orbax logs every file operation at INFO
    logging.set_verbosity(logging.WARNING)
  from phase1_jax import specs
  try:
    config = (_CONFIG.value if _CONFIG.value is not None
              else specs.load_run_config(_WORKDIR.value))
    for section, overrides in (('eval', _EVAL), ('decode', _DECODE)):
      for name, flag in overrides.items():
        if flag.value is not None:
          config[section][name] = flag.value
    config_validation.validate(config)
  except (ConfigError, OSError) as e:
    sys.exit(f'error: {e}')
  evaluate(config, _WORKDIR.value, _CHECKPOINT.value)


def evaluate(config, workdir, which='best'):
  """Evaluates a validated config's checkpoint; the stack (JAX, Orbax: seconds to import) is
  imported only now, so a bad flag or config fails in a fraction of a second."""
  from phase1_jax import specs
  from phase1_jax.data.pipeline import DataError
  from phase1_jax.inference.evaluation import evaluate_checkpoint, summary
  from phase1_jax.training.checkpoint import CheckpointError
  try:
    run = specs.run_spec(config, validated=True)
    print(summary(evaluate_checkpoint(run, workdir, which=which)))
  except (ConfigError, CheckpointError, DataError,
          OSError) as e:  # user errors, an unwritable results file (faults.WriterError): one line
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
