"""The seed's full training runs on the synthetic pages, at the default model size.

  python -m phase1_jax.train --config configs/full.py        # 5K train / 1K val, 50 epochs
  python -m phase1_jax.train --config configs/full.py:10k    # 10K / 2K, 100 epochs, batch 32
"""
from phase1_jax.config import base_config

SIZES = {
    '5k': dict(train_samples=5000, val_samples=1000, num_epochs=50, batch_size=16),
    '10k': dict(train_samples=10000, val_samples=2000, num_epochs=100, batch_size=32),
}


def get_config(size: str = '5k'):
  if size not in SIZES:
    raise ValueError(f'configs/full.py:{size}: size must be one of {", ".join(SIZES)}')
  s = SIZES[size]
  config = base_config()
  config.exp_name = f'phase1_full_{size}'
  config.data.train_samples = s['train_samples']
  config.data.val_samples = s['val_samples']
  config.train.num_epochs = s['num_epochs']
  config.train.batch_size = s['batch_size']
  config.model.attention.kind = 'dot_product'   # as configs/default.py: cuDNN on a GPU
  return config
