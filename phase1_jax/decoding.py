"""Autoregressive greedy decoding with a KV cache, and the uncached reference it must equal."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from phase1_jax.model.phase1 import Phase1Decoder


def _next_token(logits_BxV, done_B, *, bos_id: int, pad_id: int):
  """Argmax over the tokens a page can contain (never PAD or BOS); PAD once a row is done."""
  never = jnp.zeros(logits_BxV.shape[-1], bool).at[jnp.array([bos_id, pad_id])].set(True)
  best_B = jnp.argmax(jnp.where(never, -jnp.inf, logits_BxV), axis=-1).astype(jnp.int32)
  return jnp.where(done_B, pad_id, best_B)


def greedy_decode(model: Phase1Decoder, features_BxPxF, feature_mask_BxP, *, max_len: int,
                  bos_id: int, eos_id: int, pad_id: int):
  """Greedy markup for each page: tokens_BxT (T = max_len), PAD after each row's EOS.

  One decoder position per loop step with a KV cache where the attention kind allows it
  (`model.kv_cache_decoding`), else by rerunning the model on the prefix; either way the loop
  stops when every row has emitted EOS. Cross-attention K/V of the memory are computed once.
  """
  b = features_BxPxF.shape[0]
  if model.kv_cache_decoding:
    state = model.init_decode_state(features_BxPxF, max_len)

    def logits_at(pos, prev_B, tokens_BxT, state):
      detail_BxV, _, state = model.decode_step(prev_B, pos, state, feature_mask_BxP)
      return detail_BxV, state
  else:
    state = None

    def logits_at(pos, prev_B, tokens_BxT, state):
      inputs_BxT = jnp.concatenate([jnp.full((b, 1), bos_id, jnp.int32), tokens_BxT[:, :-1]], 1)
      detail_BxTxV = model(features_BxPxF, feature_mask_BxP, inputs_BxT)['detail_logits']
      return jax.lax.dynamic_index_in_dim(detail_BxTxV, pos, axis=1, keepdims=False), state

  def cond(carry):
    pos, _, done_B, _, _ = carry
    return (pos < max_len) & ~jnp.all(done_B)

  def body(carry):
    pos, prev_B, done_B, tokens_BxT, state = carry
    detail_BxV, state = logits_at(pos, prev_B, tokens_BxT, state)
    next_B = _next_token(detail_BxV, done_B, bos_id=bos_id, pad_id=pad_id)
    tokens_BxT = jax.lax.dynamic_update_slice_in_dim(tokens_BxT, next_B[:, None], pos, axis=1)
    return pos + 1, next_B, done_B | (next_B == eos_id), tokens_BxT, state

  init = (jnp.int32(0), jnp.full((b,), bos_id, jnp.int32), jnp.zeros((b,), bool),
          jnp.full((b, max_len), pad_id, jnp.int32), state)
  return jax.lax.while_loop(cond, body, init)[3]


def greedy_decode_reference(model: Phase1Decoder, features_BxPxF, feature_mask_BxP, *,
                            max_len: int, bos_id: int, eos_id: int, pad_id: int):
  """The slow definition: rerun the full model on the whole prefix for every new token."""
  b = features_BxPxF.shape[0]
  inputs_BxT = jnp.full((b, max_len), pad_id, jnp.int32).at[:, 0].set(bos_id)
  tokens_BxT = jnp.full((b, max_len), pad_id, jnp.int32)
  done_B = jnp.zeros((b,), bool)
  for pos in range(max_len):
    logits_BxV = model(features_BxPxF, feature_mask_BxP, inputs_BxT)['detail_logits'][:, pos]
    next_B = _next_token(logits_BxV, done_B, bos_id=bos_id, pad_id=pad_id)
    tokens_BxT = tokens_BxT.at[:, pos].set(next_B)
    if pos + 1 < max_len:
      inputs_BxT = inputs_BxT.at[:, pos + 1].set(next_B)
    done_B = done_B | (next_B == eos_id)
  return tokens_BxT
