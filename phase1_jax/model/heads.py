"""Output heads over the shared backbone's final states. Logits are float32."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class DualGenerationHeads(nnx.Module):
  """Detail head (next markup token over the vocabulary) and semantic head (section class per
  position). The detail head is tied to the token embedding by default (`tied=True`)."""

  def __init__(self, d_model: int, vocab_size: int, num_semantic_classes: int, *, tied: bool,
               dtype, rngs: nnx.Rngs):
    lin = lambda o: nnx.Linear(d_model, o, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.detail = None if tied else lin(vocab_size)
    self.semantic = lin(num_semantic_classes)

  def __call__(self, h_BxTxD, token_embedding_VxD=None):
    if self.detail is None:
      detail_BxTxV = jnp.einsum('btd,vd->btv', h_BxTxD, token_embedding_VxD.astype(h_BxTxD.dtype),
                                preferred_element_type=jnp.float32)
    else:
      detail_BxTxV = self.detail(h_BxTxD).astype(jnp.float32)
    return detail_BxTxV, self.semantic(h_BxTxD).astype(jnp.float32)


class ElementTypeClassifier(nnx.Module):
  """Multi-label element types of the page: masked mean and max pooling of the final states,
  then a two-layer MLP to one logit per element type."""

  def __init__(self, d_model: int, num_element_types: int, *, dtype, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(2 * d_model, d_model, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.out = nnx.Linear(d_model, num_element_types, dtype=dtype, param_dtype=jnp.float32,
                          rngs=rngs)

  def __call__(self, h_BxTxD, token_mask_BxT):
    m_BxTx1 = token_mask_BxT[..., None]
    count_Bx1 = jnp.maximum(m_BxTx1.sum(axis=1), 1).astype(h_BxTxD.dtype)
    mean_BxD = jnp.where(m_BxTx1, h_BxTxD, 0).sum(axis=1) / count_Bx1
    max_BxD = jnp.where(m_BxTx1, h_BxTxD, jnp.finfo(h_BxTxD.dtype).min).max(axis=1)
    h_BxD = jax.nn.gelu(self.hidden(jnp.concatenate([mean_BxD, max_BxD], axis=-1)))
    return self.out(h_BxD).astype(jnp.float32)
