"""Tiny config for smoke tests and CI: a few seconds per epoch on one CPU core."""
from phase1_jax.config import base_config


def get_config():
  config = base_config()
  config.exp_name = 'phase1_tiny'
  config.data.train_samples = 64
  config.data.val_samples = 16
  config.data.max_seq_len = 48
  config.data.grid_rows = 4
  config.data.max_sections = 3
  config.data.feature_dim = 16
  config.model.vocab_size = 320
  config.model.d_model = 32
  config.model.num_heads = 2
  config.model.num_layers = 2
  config.model.num_unique_layers = 1
  config.model.mlp_dim = 64
  config.model.dropout_rate = 0.1
  config.train.batch_size = 8
  config.train.num_epochs = 2
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 2
  config.train.log_every_steps = 2
  config.eval.batch_size = 8
  config.eval.bleu_samples = 8
  config.checkpoint.async_save = False
  return config
