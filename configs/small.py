"""Small config: trains on a 2-core CPU in minutes and reaches the Phase 1 targets.

    python -m phase1_jax.train --config configs/small.py
"""
from phase1_jax.config import base_config


def get_config():
  config = base_config()
  config.exp_name = 'phase1_small'
  config.data.train_samples = 4000
  config.data.val_samples = 200
  config.data.max_seq_len = 128
  config.model.vocab_size = 512
  config.model.d_model = 128
  config.model.num_heads = 4
  config.model.num_layers = 4
  config.model.num_unique_layers = 2
  config.model.mlp_dim = 512
  config.model.dropout_rate = 0.0
  # auto: on a CPU the C++ fused attention kernel (fused_cpu, model/cpu_attention.cc; the step
  # 1.17x `dense`, interleaved A/B, 16 rounds), `dense` where no C++ compiler is found; on a GPU
  # cuDNN's fused attention (dot_product).
  config.model.attention.kind = 'auto'
  # model.scan_layers and model.compute_dtype stay auto: unrolled layers (the step 1.04-1.7x faster
  # than scanned, by CPU and attention kind) and, on CPU, float32 (1.03-1.39x faster than
  # bfloat16), measured with benchmarks/train_step.py on 2 cores; bfloat16 on a GPU/TPU.
  config.train.batch_size = 32
  # On CPU the train CLI splits the host into one device per core (parallel.cpu_devices); pmap
  # over them measured 1.15-1.19x one device, jit data parallelism 1.10-1.12x (2 cores).
  config.parallel.mode = 'pmap'
  config.train.num_epochs = 6
  # Measured: after 300 steps, lr 1e-3 reached element F1 0.62 and lr 2e-3 0.88.
  config.train.learning_rate = 2e-3
  config.train.warmup_steps = 100
  config.eval.batch_size = 100
  config.eval.bleu_samples = 200
  return config
