"""Trains on your own pages: a directory written by `python -m phase1_jax.data.prepare`.

    python -m phase1_jax.data.prepare --html_dir pages/ --out data/pages
    python -m phase1_jax.train --config configs/html.py:data/pages

The model is configs/small.py's; model.vocab_size (rounded up to a multiple of 128), the head
sizes (the dataset's section classes and element types) and data.feature_dim come from the
directory's dataset.json, so the config always fits the data.
"""
from phase1_jax.config import base_config
from phase1_jax.config_dataset import fit_to_dataset


def get_config(path: str = ''):
  config = base_config()
  config.exp_name = 'phase1_html'
  # Real pages are longer than synthetic ones; longer pages are cut (the summary of prepare
  # prints the token percentiles to choose this from).
  config.data.max_seq_len = 512
  config.model.d_model = 128
  config.model.num_heads = 4
  config.model.num_layers = 4
  config.model.num_unique_layers = 2
  config.model.mlp_dim = 512
  config.model.dropout_rate = 0.1
  config.train.batch_size = 16
  config.train.num_epochs = 20
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 200
  config.eval.batch_size = 32
  config.eval.bleu_samples = 32     # greedy decoding of 512 tokens is the slow part of eval
  return fit_to_dataset(config, path)
