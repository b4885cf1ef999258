"""Long pages on a GPU: T = 16384 decoder positions, the default model's width (d_model 768, 12
heads of 64, 6 layer applications over 3 unique blocks), bfloat16 compute, `window` attention
(w = 512): on a GPU its Pallas kernel, which reads only the band's key blocks
(model/sparse_dispatch.py). The GPU-sized sibling of configs/long.py.

  python -m phase1_jax.train --config configs/long_gpu.py
  python benchmarks/train_step.py --config configs/long_gpu.py --depths '' \
      --variants bfloat16_unrolled_window,bfloat16_unrolled_dot_product      # the issue's bar

Pages fill about 95% of T (288..320 sections of up to 12 elements), so `dot_product`'s key
lengths do not make it cheaper than a full page would. The patch grid is 320 x 2: cross-attention
of the sparse kinds runs `dense` (AttentionSpec.bidirectional), O(T x patches). Vocabulary 512
as configs/long.py (the synthetic pages' tokens fit), so the B x T x V logits stay small.
"""
from phase1_jax.config import base_config


def get_config():
  config = base_config()
  config.exp_name = 'phase1_long_gpu'
  config.data.train_samples = 2048
  config.data.val_samples = 64
  config.data.max_seq_len = 16384
  config.data.grid_rows = 320             # one band of rows per section at least
  config.data.grid_cols = 2
  config.data.min_sections = 288
  config.data.max_sections = 320
  config.data.max_elements_per_section = 12
  config.data.max_words_per_element = 8
  config.model.vocab_size = 512
  config.model.compute_dtype = 'bfloat16'
  config.model.attention.kind = 'window'
  config.model.attention.window_size = 512
  config.model.attention.block_size = 128  # the XLA fallback's blocks and the decoding cache's
  config.train.batch_size = 4
  config.train.num_epochs = 2
  config.train.learning_rate = 3e-4
  config.train.warmup_steps = 50
  config.train.log_every_steps = 10
  config.eval.batch_size = 4
  # Greedy decoding of 16k-token pages for BLEU would dominate an epoch: the best checkpoint is
  # picked by val_loss, as in configs/long.py.
  config.eval.bleu_samples = 0
  config.checkpoint.best_metric = 'val_loss'
  return config
