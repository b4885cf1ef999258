"""The seed's defaults: d_model 768, 6 layers, 12 heads, vocab 50000, 50 semantic classes,
30 element types, batch 16, lr 1e-4, weight decay 0.01, 50 epochs, 5000/1000 samples.

Sized for a GPU/TPU (bfloat16 compute there); on a CPU prefer configs/small.py. Attention is the
`dot_product` kind: cuDNN's fused attention on a GPU (the train step 1.16x faster than `dense`
on an H100, docs/performance.md); on other devices XLA's, equal to `dense`.
"""
from phase1_jax.config import base_config


def get_config():
  config = base_config()
  config.model.attention.kind = 'dot_product'
  return config
