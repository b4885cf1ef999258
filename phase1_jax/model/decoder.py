"""Pre-LN decoder layers, and the backbone that applies them with cross-layer weight sharing."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from phase1_jax.model import kv_cache
from phase1_jax.model.attention import DENSE, AttentionSpec
from phase1_jax.model.layers import Dense, LayerNorm


class MultiHeadAttention(nnx.Module):
  """Self-attention (fused QKV) or cross-attention (Q from x, fused KV from the memory)."""

  def __init__(self, d_model: int, num_heads: int, *, cross: bool, dtype, rngs: nnx.Rngs):
    self.num_heads, self.cross = num_heads, cross
    lin = lambda i, o: Dense(i, o, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    if cross:
      self.q, self.kv = lin(d_model, d_model), lin(d_model, 2 * d_model)
    else:
      self.qkv = lin(d_model, 3 * d_model)
    self.out = lin(d_model, d_model)

  def __call__(self, x_BxTxD, memory_BxSxD=None, kv_mask_BxS=None, *, kv_lengths_B=None,
               causal: bool = False, attention: AttentionSpec = DENSE):
    b, t, d = x_BxTxD.shape
    if self.cross:
      q_BxTxNxH = self._heads(self.q(x_BxTxD))
      k_BxSxNxH, v_BxSxNxH = self.memory_kv(memory_BxSxD)
    else:
      q_BxTxNxH, k_BxSxNxH, v_BxSxNxH = (
          self._heads(y) for y in jnp.split(self.qkv(x_BxTxD), 3, axis=-1))
    out_BxTxNxH = attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS,
                            kv_lengths_B=kv_lengths_B, causal=causal)
    return self.out(out_BxTxNxH.reshape(b, t, d))

  def _heads(self, y):
    return y.reshape(*y.shape[:2], self.num_heads, -1)

  def memory_kv(self, memory_BxSxD):
    """Cross-attention keys and values of the memory, computed once per sequence."""
    k_BxSxD, v_BxSxD = jnp.split(self.kv(memory_BxSxD), 2, axis=-1)
    return self._heads(k_BxSxD), self._heads(v_BxSxD)

  def cross_step(self, x_BxTxD, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS):
    """Cross-attention against precomputed memory keys/values."""
    b, t, d = x_BxTxD.shape
    out = DENSE(self._heads(self.q(x_BxTxD)), k_BxSxNxH, v_BxSxNxH, kv_mask_BxS)
    return self.out(out.reshape(b, t, d))

  def self_step(self, x_Bx1xD, cache: dict, pos, index, attention: AttentionSpec):
    """One decoding position `pos` of layer application `index` against the KV cache
    (kv_cache.py), which it returns updated."""
    b, _, d = x_Bx1xD.shape
    q, k, v = (self._heads(y)[:, 0] for y in jnp.split(self.qkv(x_Bx1xD), 3, axis=-1))
    out_BxNxH, cache = kv_cache.step(cache, q, k, v, pos, index, attention)
    return self.out(out_BxNxH.reshape(b, 1, d)), cache


class DecoderLayer(nnx.Module):
  """x + SelfAttn(LN(x)) -> + CrossAttn(LN(x), memory) -> + MLP(LN(x)); dropout on each branch.

  Tokens and memory are masked by lengths: positions [0, length) are real. Self-attention runs
  `attention`; cross-attention its `bidirectional()` form (the same `dot_product` or `fused_cpu`
  kind, `dense` otherwise: the sparse kinds are causal self-attention only).
  """

  def __init__(self, d_model: int, num_heads: int, mlp_dim: int, *, dropout_rate: float, dtype,
               attention: AttentionSpec, rngs: nnx.Rngs):
    norm = lambda: LayerNorm(d_model, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.self_norm, self.cross_norm, self.mlp_norm = norm(), norm(), norm()
    self.self_attn = MultiHeadAttention(d_model, num_heads, cross=False, dtype=dtype, rngs=rngs)
    self.cross_attn = MultiHeadAttention(d_model, num_heads, cross=True, dtype=dtype, rngs=rngs)
    self.mlp_in = Dense(d_model, mlp_dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.mlp_out = Dense(mlp_dim, d_model, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    # No stored RNG: keys come in as arguments so the layer can be scanned and shared.
    self.dropout = nnx.Dropout(dropout_rate)
    self.attention, self.cross_attention = attention, attention.bidirectional()

  def __call__(self, x_BxTxD, token_lengths_B, memory_BxSxD, memory_lengths_B, dropout_key=None):
    deterministic = dropout_key is None
    keys = [None] * 3 if deterministic else list(jax.random.split(dropout_key, 3))
    drop = lambda y, k: self.dropout(y, deterministic=deterministic, rngs=k)
    h = self.self_attn(self.self_norm(x_BxTxD), kv_lengths_B=token_lengths_B, causal=True,
                       attention=self.attention)
    x_BxTxD = x_BxTxD + drop(h, keys[0])
    h = self.cross_attn(self.cross_norm(x_BxTxD), memory_BxSxD, kv_lengths_B=memory_lengths_B,
                        attention=self.cross_attention)
    x_BxTxD = x_BxTxD + drop(h, keys[1])
    return x_BxTxD + drop(self._mlp(x_BxTxD), keys[2])

  def _mlp(self, x_BxTxD):
    return self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x_BxTxD))))

  def decode_step(self, x_Bx1xD, cache: dict, pos, index, memory_k, memory_v, memory_mask_BxS):
    """The layer as application `index`, at one position, with the KV cache (no dropout):
    (x_Bx1xD, cache)."""
    h, cache = self.self_attn.self_step(self.self_norm(x_Bx1xD), cache, pos, index,
                                        self.attention)
    x_Bx1xD = x_Bx1xD + h
    x_Bx1xD = x_Bx1xD + self.cross_attn.cross_step(self.cross_norm(x_Bx1xD), memory_k, memory_v,
                                                   memory_mask_BxS)
    return x_Bx1xD + self._mlp(x_Bx1xD), cache


# model.remat_policy: which intermediates of a layer application the backward pass may keep
# (everything else is recomputed). Names are jax.checkpoint_policies'.
REMAT_POLICIES = {
    'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable':
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class SharedDecoderBackbone(nnx.Module):
  """`num_layers` applications of `num_unique_layers` distinct layers: application i uses i % U.

  The U layers are stored stacked (every param has a leading axis U). With `scan=True` the
  applications run under `lax.scan`, so compile time stays flat in depth; `remat=True` recomputes
  each application's activations in the backward pass instead of storing them, except what
  `remat_policy` (a REMAT_POLICIES name) lets it keep.
  """

  def __init__(self, *, num_layers: int, num_unique_layers: int, scan: bool = True,
               remat: bool = False, remat_policy: str = 'nothing_saveable', rngs: nnx.Rngs,
               **layer_kwargs):
    if remat_policy not in REMAT_POLICIES:
      raise ValueError(f'remat_policy={remat_policy!r}: must be one of '
                       f'{", ".join(REMAT_POLICIES)}')
    self.num_layers, self.num_unique_layers = num_layers, num_unique_layers
    self.scan, self.remat, self.remat_policy = scan, remat, remat_policy

    @nnx.split_rngs(splits=num_unique_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return DecoderLayer(rngs=rngs, **layer_kwargs)

    self.layers = create(rngs)

  def __call__(self, x_BxTxD, token_lengths_B, memory_BxSxD, memory_lengths_B, dropout_key=None):
    """Positions [0, token_lengths_B) of x and [0, memory_lengths_B) of the memory are real."""
    graphdef, stacked = nnx.split(self.layers)
    u = self.num_unique_layers

    def apply(x, i, key):
      params = jax.tree.map(lambda p: p[i % u] if isinstance(i, int)
                            else jax.lax.dynamic_index_in_dim(p, i % u, keepdims=False), stacked)
      return nnx.merge(graphdef, params)(x, token_lengths_B, memory_BxSxD, memory_lengths_B, key)

    if self.remat:
      apply = jax.checkpoint(apply, static_argnums=() if self.scan else (1,),
                             policy=REMAT_POLICIES[self.remat_policy])
    keys = (None if dropout_key is None else jax.random.split(dropout_key, self.num_layers))
    if not self.scan:
      for i in range(self.num_layers):
        x_BxTxD = apply(x_BxTxD, i, None if keys is None else keys[i])
      return x_BxTxD

    def body(x, xs):
      i, key = xs
      return apply(x, i, key), None

    x_BxTxD, _ = jax.lax.scan(body, x_BxTxD, (jnp.arange(self.num_layers), keys))
    return x_BxTxD

  def memory_kv(self, memory_BxSxD):
    """Cross-attention K/V of the memory for each unique layer: two [U, B, S, N, H] arrays.
    Applications sharing a layer share its memory K/V, so this is computed U times, not L."""
    return nnx.vmap(lambda layer: layer.cross_attn.memory_kv(memory_BxSxD))(self.layers)

  def decode_step(self, x_Bx1xD, cache: dict, pos, memory_kv, memory_mask_BxS):
    """All applications at one position. cache: kv_cache.init's dict, leading axis L, carried
    whole through the loop over applications so each writes its row in place (a scan over
    per-application slices copied the whole cache at every position)."""
    graphdef, stacked = nnx.split(self.layers)
    u = self.num_unique_layers
    memory_k, memory_v = memory_kv

    def body(i, carry):
      x, cache = carry
      pick = lambda p: jax.lax.dynamic_index_in_dim(p, i % u, keepdims=False)
      layer = nnx.merge(graphdef, jax.tree.map(pick, stacked))
      return layer.decode_step(x, cache, pos, i, pick(memory_k), pick(memory_v),
                               memory_mask_BxS)

    return jax.lax.fori_loop(0, self.num_layers, body, (x_Bx1xD, cache))
