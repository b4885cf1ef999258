"""Attention behind one function: every kind takes the same arguments and returns the same shape.

`attend(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS, causal=..., kind=...) -> BxTxNxH`.
`dense` is the reference: scores and softmax in float32, masks applied as a large negative bias
(finite, so a fully masked row gives a uniform average instead of NaN).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ('dense',)
_NEG = -1e30


def dense_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS=None, *, causal: bool = False):
  """Plain masked softmax attention, O(T*S) memory. Output dtype = q's dtype."""
  dtype = q_BxTxNxH.dtype
  scale = q_BxTxNxH.shape[-1] ** -0.5
  scores_BxNxTxS = jnp.einsum('btnh,bsnh->bnts', q_BxTxNxH * jnp.asarray(scale, dtype), k_BxSxNxH,
                              preferred_element_type=jnp.float32)
  t, s = scores_BxNxTxS.shape[-2:]
  mask = jnp.ones((1, 1, t, s), bool)
  if causal:
    # Query i sits at key position i + (s - t): it sees keys up to itself (t == s in training).
    mask = mask & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t))[None, None]
  if kv_mask_BxS is not None:
    mask = mask & kv_mask_BxS[:, None, None, :]
  scores_BxNxTxS = jnp.where(mask, scores_BxNxTxS, _NEG)
  probs_BxNxTxS = jax.nn.softmax(scores_BxNxTxS, axis=-1).astype(dtype)
  return jnp.einsum('bnts,bsnh->btnh', probs_BxNxTxS, v_BxSxNxH)


def attend(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS=None, *, causal: bool = False,
           kind: str = 'dense'):
  """Multi-head attention of T queries over S keys; `kind` picks the implementation."""
  if kind == 'dense':
    return dense_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS, causal=causal)
  raise ValueError(f'attention kind {kind!r}: must be one of {", ".join(KINDS)}')
