"""Long pages (T = 4096 decoder positions) with block-sparse `window_topk` self-attention, sized to
train on a CPU: attention cost grows linearly in T instead of quadratically.

  python -m phase1_jax.train --config configs/long.py
"""
from phase1_jax.config import base_config


def get_config():
  config = base_config()
  config.exp_name = 'phase1_long'
  config.data.train_samples = 256
  config.data.val_samples = 16
  config.data.max_seq_len = 4096
  config.data.grid_rows = 64              # up to 64 sections, one band of rows each at least
  config.data.grid_cols = 8
  config.data.min_sections = 16
  config.data.max_sections = 64
  config.data.max_elements_per_section = 12
  config.data.max_words_per_element = 8
  config.model.vocab_size = 512
  config.model.d_model = 64
  config.model.num_heads = 4
  config.model.num_layers = 2
  config.model.num_unique_layers = 1
  config.model.mlp_dim = 256
  config.model.dropout_rate = 0.0
  config.model.attention.kind = 'window_topk'
  config.model.attention.window_size = 256
  config.model.attention.top_k = 4
  config.model.attention.block_size = 128
  config.train.batch_size = 2
  config.train.num_epochs = 2
  config.train.learning_rate = 2e-3
  config.train.warmup_steps = 20
  config.train.log_every_steps = 10
  config.eval.batch_size = 4
  # Greedy decoding with window_topk reruns the model per token (no cached top-k decode step yet):
  # far too slow at T = 4096 on a CPU, so no BLEU; the best checkpoint is picked by val_loss.
  config.eval.bleu_samples = 0
  config.checkpoint.best_metric = 'val_loss'
  return config
