"""Decode pages with a trained checkpoint into JSON Lines (schemas/generation.schema.json).

  python -m phase1_jax.generate --workdir experiments/NAME [--num_samples N] [--output F]
      [--features pages.npy] [--strategy greedy|sample|beam|mbr] [--beam_size 4] [--temperature 0.8]
      [--top_k 50] [--top_p 0.9] [--length_penalty 0.6] [--candidates 8] [--seed 0]
      [--checkpoint best|latest]

The run's config comes from <workdir>/config.json; the decoding flags override its `decode`
section (`--config path` instead reads a config file, with `--config.decode.*` overrides).
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from phase1_jax.config import ConfigError
from phase1_jax.config_validation import parse_flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'Experiment directory (checkpoints/, config.json).')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file; default: the workdir\'s '
                                          'config.json.', lock_config=False)
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', None, 'Pages to decode (default: all).')
_OUTPUT = flags.DEFINE_string('output', None, 'JSON Lines file (default: '
                              '<workdir>/generations.jsonl).')
_FEATURES = flags.DEFINE_string('features', None, '.npy of features [pages, patches, '
                                'feature_dim] to decode instead of the validation split.')
_CHECKPOINT = flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint.')
_DECODE = {
    'strategy': flags.DEFINE_enum('strategy', None, ['greedy', 'sample', 'beam', 'mbr'],
                                  'Decoding.'),
    'max_len': flags.DEFINE_integer('max_len', None, 'Tokens per page incl. EOS.'),
    'temperature': flags.DEFINE_float('temperature', None, 'Sampling temperature.'),
    'top_k': flags.DEFINE_integer('top_k', None, 'Sample from the k most likely tokens.'),
    'top_p': flags.DEFINE_float('top_p', None, 'Nucleus sampling mass.'),
    'beam_size': flags.DEFINE_integer('beam_size', None, 'Beam width.'),
    'length_penalty': flags.DEFINE_float('length_penalty', None, 'Beam length penalty alpha.'),
    'candidates': flags.DEFINE_integer('candidates', None, 'mbr: pages decoded, one kept.'),
    'seed': flags.DEFINE_integer('seed', None, 'Sampling seed.'),
}
flags.mark_flag_as_required('workdir')


def main(argv):
  """Imports the stack (JAX, Orbax: seconds) only once the flags parsed: a bad one fails fast."""
  del argv
  from phase1_jax import specs
  from phase1_jax.data.pipeline import DataError
  from phase1_jax.inference.generation import InputError, generate_pages
  from phase1_jax.training.checkpoint import CheckpointError
  if not flags.FLAGS['verbosity'].present:  # Orbax logs every file operation at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    config = (_CONFIG.value if _CONFIG.value is not None
              else specs.load_run_config(_WORKDIR.value))
    for name, flag in _DECODE.items():
      if flag.value is not None:
        config.decode[name] = flag.value
    path, pages = generate_pages(
        specs.run_spec(config), _WORKDIR.value, num_samples=_NUM_SAMPLES.value,
        output=_OUTPUT.value, features_path=_FEATURES.value, which=_CHECKPOINT.value)
  except (ConfigError, CheckpointError, DataError, InputError,
          OSError) as e:  # user errors, a missing file, a full disk (faults.WriterError): one line
    sys.exit(f'error: {e}')
  print(f'Wrote {pages} pages to {path}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
