"""ModelSpec: everything that fixes the decoder's structure, as one frozen value.

The config is read into it once, at the boundary (phase1_jax/specs.py resolves every `auto`);
the model and everything below take the spec, never the config tree, as the Flax lm1b example's
TransformerConfig and nanodo's DoConfig do. `Phase1Decoder(spec, rngs=...)` builds the model.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from phase1_jax.model.attention import AttentionSpec

DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The decoder's sizes and choices, resolved (no 'auto' left).

  feature_dim: F per patch (pixel input: 2 + 3 * patch_size**2). patch_size > 0: a screenshot's
  patches read by a patch encoder of `encoder_layers` layers over at most `max_patches` patches;
  0: fused features through one projection. dtype: the compute dtype (params stay float32).
  attention: the decoder's self-attention (the cross-attention and the encoder run its
  bidirectional form). patch_labels: a patch head for the encoder's patch-label loss;
  patch_words: a patch word head (each patch's visible BPE tokens) for the patch-word loss.
  """
  vocab_size: int
  num_semantic_classes: int
  num_element_types: int
  feature_dim: int
  max_seq_len: int
  d_model: int
  num_heads: int
  num_layers: int
  num_unique_layers: int
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: str = 'float32'
  attention: AttentionSpec = AttentionSpec()
  tie_detail_head: bool = True
  scan_layers: bool = True
  remat: bool = False
  remat_policy: str = 'nothing_saveable'
  pad_id: int = 0
  patch_size: int = 0
  max_patches: int = 0
  encoder_layers: int = 0
  patch_labels: bool = False
  patch_words: bool = False

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f'dtype={self.dtype!r}: must be one of {", ".join(DTYPES)} (resolved)')
    if not isinstance(self.attention, AttentionSpec):
      raise ValueError(f'attention={self.attention!r}: must be an AttentionSpec')

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)
