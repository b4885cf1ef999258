"""Screenshot pixels -> markup on a 2-core CPU: a prepared pixel dataset (patches of 16 x 16 px).

    python -m phase1_jax.data.prepare --html_dir pages/ --out data/pixels --render \\
      --patch_size 16 --max_patches 256
    python -m phase1_jax.train --config configs/pixels_small.py:data/pixels

model.vocab_size (rounded up to a multiple of 128), the label counts, data.feature_dim,
data.patch_size and data.max_patches (the patches per page it was prepared with) come from the
directory's dataset.json, so the config always fits the data. A patch encoder of 2 layers reads
the patches (model/encoder.py) and learns each patch's labels (loss.patch_weight: a dataset
prepared without them needs --config.loss.patch_weight=0). To have the encoder also learn to
read, which BPE tokens of the visible text lie on each patch (a dataset prepared with patch
words, dataset.json `patch_words: true`), add e.g. --config.loss.patch_words_weight=1.0 (off
by default; its batches hold each page's (patch, token) pairs).
"""
from phase1_jax.config import base_config
from phase1_jax.config_dataset import fit_to_dataset


def get_config(path: str = ''):
  config = base_config()
  config.exp_name = 'phase1_pixels_small'
  config.data.max_seq_len = 256
  config.data.patch_size = 16
  config.data.max_patches = 256
  config.data.feature_dim = 2 + 3 * 16 * 16
  config.model.d_model = 256
  config.model.num_heads = 4
  config.model.num_layers = 4
  config.model.num_unique_layers = 2
  config.model.mlp_dim = 1024
  config.model.encoder_layers = 2
  config.model.dropout_rate = 0.0
  # auto: the C++ fused attention kernel on a CPU (fused_cpu; the encoder's bidirectional
  # attention and the cross-attention too), cuDNN's on a GPU.
  config.model.attention.kind = 'auto'
  # The encoder also learns each patch's section class and element type from the rendered boxes
  # (prepare --render stores them): the decoder then finds the page's layout in its memory.
  config.loss.patch_weight = 0.5
  # As configs/small.py: one device per core, pmap over them.
  config.parallel.mode = 'pmap'
  config.train.batch_size = 16
  # An upper bound of about 30 minutes on 2 cores: a step of this model measured about 1.7 s
  # (one device, jit, fused_cpu, vocab 8064, busy machine), so ~1,000 steps = 16,000 pages, e.g.
  # 10 epochs of 1,600 train pages; scale it to the dataset. Training ends at the first epoch
  # whose evaluation meets every target.
  config.train.num_epochs = 10
  config.train.stop_when_targets_met = True
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 200
  config.eval.batch_size = 32
  config.eval.bleu_samples = 64     # greedy decoding of 256 tokens is the slow part of eval
  # The decoded pages rendered and compared with their references (visual_metrics; needs
  # Chromium), in worker processes while the next batch decodes. 0: off.
  config.eval.render_samples = 64
  return fit_to_dataset(config, path)
