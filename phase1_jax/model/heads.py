"""Output heads over the shared backbone's final states. Logits are float32."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from phase1_jax.model.layers import Dense, logits_matmul


class DualGenerationHeads(nnx.Module):
  """Detail head (next markup token over the vocabulary) and semantic head (section class per
  position). The detail head is tied to the token embedding by default (`tied=True`)."""

  def __init__(self, d_model: int, vocab_size: int, num_semantic_classes: int, *, tied: bool,
               dtype, rngs: nnx.Rngs):
    lin = lambda o: Dense(d_model, o, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.detail = None if tied else lin(vocab_size)
    self.semantic = lin(num_semantic_classes)

  def detail_weights(self, token_embedding_VxD, dtype):
    """(weight_VxD, bias_V or None) of the detail head: what a chunked loss needs instead of the
    logits (logits = h @ weight.T + bias)."""
    if self.detail is None:
      return token_embedding_VxD.astype(dtype), None
    return self.detail.kernel[...].T.astype(dtype), self.detail.bias[...]

  def __call__(self, h_BxTxD, token_embedding_VxD=None):
    """(detail logits [B, T, V], semantic logits [B, T, C]), both float32: the detail logits
    accumulate in float32 whatever the compute dtype, as the training loss builds them."""
    weight_VxD, bias_V = self.detail_weights(token_embedding_VxD, h_BxTxD.dtype)
    # On a 2-D [tokens, D] view, as in Dense: avoids a transposed copy for the weight gradient.
    detail_NxV = logits_matmul(h_BxTxD.reshape(-1, h_BxTxD.shape[-1]), weight_VxD, bias_V)
    return detail_NxV.reshape(*h_BxTxD.shape[:-1], -1), self.semantic_logits(h_BxTxD)

  def semantic_logits(self, h_BxTxD):
    """Section-class logits per position, float32 [B, T, C]."""
    return self.semantic(h_BxTxD).astype(jnp.float32)


class ElementTypeClassifier(nnx.Module):
  """Multi-label element types of the page by masked attention pooling: each element type has a
  learned query that attends over the valid positions' final states (so it can find the place
  where its markup is), and its logit reads the pooled state.

  [batch, seq, d_model] states + [batch, seq] mask -> [batch, num_element_types] float32 logits.
  """

  def __init__(self, d_model: int, num_element_types: int, *, dtype, rngs: nnx.Rngs):
    init = nnx.initializers.normal(d_model ** -0.5)
    self.queries_ExD = nnx.Param(init(rngs.params(), (num_element_types, d_model), jnp.float32))
    self.readout_ExD = nnx.Param(init(rngs.params(), (num_element_types, d_model), jnp.float32))
    self.bias_E = nnx.Param(jnp.zeros((num_element_types,), jnp.float32))
    self.dtype = dtype

  def __call__(self, h_BxTxD, token_mask_BxT):
    h_BxTxD = h_BxTxD.astype(self.dtype)
    # No 1/sqrt(d) scaling: the queries are free parameters, and with Adam's fixed step size a
    # scaled score would need ~sqrt(d) times more steps to grow peaked enough to find one token.
    scores_BxExT = jnp.einsum('btd,ed->bet', h_BxTxD, self.queries_ExD[...].astype(self.dtype),
                              preferred_element_type=jnp.float32)
    scores_BxExT = jnp.where(token_mask_BxT[:, None, :], scores_BxExT, -1e30)
    weights_BxExT = jax.nn.softmax(scores_BxExT, axis=-1).astype(self.dtype)
    pooled_BxExD = jnp.einsum('bet,btd->bed', weights_BxExT, h_BxTxD)
    return jnp.einsum('bed,ed->be', pooled_BxExD, self.readout_ExD[...].astype(self.dtype),
                      preferred_element_type=jnp.float32) + self.bias_E[...][None, :]
