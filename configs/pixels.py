"""Screenshot pixels -> markup at GPU size: a prepared pixel dataset (patches of 16 x 16 px, up to
1024 per page), d_model 768, 6 decoder applications over 3 unique layers, a 4-layer encoder.

    python -m phase1_jax.data.prepare --html_dir pages/ --out data/pixels --render \\
      --patch_size 16 --max_patches 1024
    python -m phase1_jax.train --config configs/pixels.py:data/pixels

model.vocab_size (rounded up to a multiple of 128), the label counts, data.feature_dim,
data.patch_size and data.max_patches (the patches per page it was prepared with) come from the
directory's dataset.json. bfloat16 compute and cuDNN's fused attention on a GPU (compute_dtype
and attention kind auto).
"""
from phase1_jax.config import base_config
from phase1_jax.config_dataset import fit_to_dataset


def get_config(path: str = ''):
  config = base_config()
  config.exp_name = 'phase1_pixels'
  config.data.max_seq_len = 1024
  config.data.patch_size = 16
  config.data.max_patches = 1024
  config.data.feature_dim = 2 + 3 * 16 * 16
  config.model.d_model = 768
  config.model.num_heads = 12
  config.model.num_layers = 6
  config.model.num_unique_layers = 3
  config.model.mlp_dim = 3072
  config.model.encoder_layers = 4
  config.model.compute_dtype = 'auto'       # bfloat16 on a GPU/TPU
  config.model.attention.kind = 'auto'      # dot_product (cuDNN) on a GPU
  # The encoder also learns each patch's section class and element type from the rendered boxes
  # (prepare --render stores them): the decoder then finds the page's layout in its memory.
  config.loss.patch_weight = 0.5
  config.parallel.mode = 'jit'
  config.train.batch_size = 64
  config.train.learning_rate = 3e-4
  config.train.warmup_steps = 1000
  config.train.stop_when_targets_met = True
  config.eval.batch_size = 64
  config.eval.bleu_samples = 128
  # The decoded pages rendered and compared with their references (visual_metrics; needs
  # Chromium), in worker processes while the next batch decodes. 0: off.
  config.eval.render_samples = 128
  return fit_to_dataset(config, path)
