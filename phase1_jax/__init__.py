"""phase1_jax: a multi-task transformer decoder (markup, section semantics, UI element types)."""
from phase1_jax.config import ConfigError, base_config, validate
from phase1_jax.model.phase1 import Phase1Decoder

__all__ = ['ConfigError', 'Phase1Decoder', 'base_config', 'validate']
