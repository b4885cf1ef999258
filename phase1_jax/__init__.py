"""phase1_jax: a multi-task transformer decoder (markup, section semantics, UI element types)."""
from phase1_jax.config import ConfigError, base_config
from phase1_jax.config_validation import validate

__all__ = ['ConfigError', 'Phase1Decoder', 'base_config', 'train_and_evaluate', 'validate']


def __getattr__(name):
  # The model (jax, flax) and the training stack (Orbax, grain, tensorboardX) load only when asked
  # for: the data tools' worker processes never need them.
  if name == 'Phase1Decoder':
    from phase1_jax.model.phase1 import Phase1Decoder
    return Phase1Decoder
  if name == 'train_and_evaluate':
    from phase1_jax.training.loop import train_and_evaluate
    return train_and_evaluate
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
