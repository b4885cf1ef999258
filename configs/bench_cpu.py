"""The CPU train-step benchmark shape (docs/performance.md, "Against PyTorch eager"): d_model 256,
4 layer applications of 2 unique layers, 4 heads, MLP 1024, sequence 256, batch 16, 64 memory
patches, vocabulary 2048.

    python benchmarks/vs_pytorch.py                      # ours vs PyTorch eager, same run
    python benchmarks/train_step.py --config configs/bench_cpu.py
"""
from phase1_jax.config import base_config


def get_config():
  config = base_config()
  config.exp_name = 'phase1_bench_cpu'
  config.data.train_samples = 64
  config.data.val_samples = 16
  config.data.max_seq_len = 256
  config.data.grid_rows = 16             # 16 x 4 = 64 memory patches
  config.data.grid_cols = 4
  config.model.vocab_size = 2048
  config.model.d_model = 256
  config.model.num_heads = 4
  config.model.num_layers = 4
  config.model.num_unique_layers = 2
  config.model.mlp_dim = 1024
  # No dropout: the PyTorch twin in benchmarks/ has none either, so both count the same work.
  config.model.dropout_rate = 0.0
  config.model.scan_layers = False
  config.model.compute_dtype = 'float32'
  # The C++ fused attention kernel (model/cpu_attention.cc): the step 1.147x `dense` (interleaved
  # A/B, 16 rounds). PyTorch's twin runs its own fused CPU attention (scaled_dot_product_attention).
  config.model.attention.kind = 'fused_cpu'
  config.train.batch_size = 16
  # On CPU the train CLI splits the host into one device per core (parallel.cpu_devices); pmap
  # over them measured 1.15-1.19x one device, jit data parallelism 1.10-1.12x (2 cores).
  config.parallel.mode = 'pmap'
  return config
