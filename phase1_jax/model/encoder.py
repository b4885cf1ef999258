"""Patch encoder: a screenshot's patches (Pix2Struct's "flattened patches") -> the decoder's memory.

Input layout, `features_BxPxF` with F = 2 + patch_size * patch_size * 3: [..., 0] the patch's row,
[..., 1] its column (small integers stored as float32), [..., 2:] its RGB pixels in [0, 1] in
(y, x, channel) order. The patch's pixels are embedded by one linear map, its position by a
learned row and a learned column embedding (Pix2Struct's 2-D positions: any aspect ratio, no
fixed grid), then pre-LN transformer layers attend over the patches in both directions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from phase1_jax.model.attention import DENSE, AttentionSpec
from phase1_jax.model.decoder import MultiHeadAttention
from phase1_jax.model.layers import Dense, Embed, LayerNorm


def patch_feature_dim(patch_size: int) -> int:
  """F of the flattened-patches layout: row, column and the patch's RGB pixels."""
  return 2 + 3 * patch_size * patch_size


class EncoderLayer(nnx.Module):
  """x + SelfAttn(LN(x)) -> + MLP(LN(x)), bidirectional; dropout on each branch (as DecoderLayer).

  Patches [0, length) are real: the others are never attended (their own rows are computed
  but meaningless). Attention runs `attention` (a kind that takes lengths, or `dense`).
  """

  def __init__(self, d_model: int, num_heads: int, mlp_dim: int, *, dropout_rate: float, dtype,
               attention: AttentionSpec, rngs: nnx.Rngs):
    norm = lambda: LayerNorm(d_model, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.attn_norm, self.mlp_norm = norm(), norm()
    self.attn = MultiHeadAttention(d_model, num_heads, cross=False, dtype=dtype, rngs=rngs)
    self.mlp_in = Dense(d_model, mlp_dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.mlp_out = Dense(mlp_dim, d_model, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    # No stored RNG: keys come in as arguments (as in DecoderLayer).
    self.dropout = nnx.Dropout(dropout_rate)
    self.attention = attention

  def __call__(self, x_BxPxD, lengths_B, dropout_key=None):
    deterministic = dropout_key is None
    keys = [None] * 2 if deterministic else list(jax.random.split(dropout_key))
    drop = lambda y, k: self.dropout(y, deterministic=deterministic, rngs=k)
    h = self.attn(self.attn_norm(x_BxPxD), kv_lengths_B=lengths_B, causal=False,
                  attention=self.attention)
    x_BxPxD = x_BxPxD + drop(h, keys[0])
    h = self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x_BxPxD))))
    return x_BxPxD + drop(h, keys[1])


def standardize(pixels_BxPxF, lengths_B):
  """Each page's pixels to zero mean and unit variance over its real patches, as Pix2Struct's
  image processor does (std floored at 1/sqrt(count)). Without it a mostly white page embeds as
  one large constant vector that the final LayerNorm keeps, and the patches differ by little.
  Padded patches come out as zeros."""
  real_BxPx1 = (jnp.arange(pixels_BxPxF.shape[1])[None] < lengths_B[:, None])[..., None]
  count_B = jnp.maximum(lengths_B, 1).astype(jnp.float32) * pixels_BxPxF.shape[2]
  mean_B = jnp.where(real_BxPx1, pixels_BxPxF, 0).sum((1, 2)) / count_B
  centred_BxPxF = jnp.where(real_BxPx1, pixels_BxPxF - mean_B[:, None, None], 0)
  std_B = jnp.sqrt((centred_BxPxF ** 2).sum((1, 2)) / count_B)
  return centred_BxPxF / jnp.maximum(std_B, jax.lax.rsqrt(count_B))[:, None, None]


class PatchEncoder(nnx.Module):
  """Flattened patches [B, P, 2 + 3 ps^2] -> memory [B, P, d_model] (final LayerNorm applied).

  Per-page standardized pixels (`standardize`) -> linear patch embedding + row embedding +
  column embedding (tables of `max_patches` rows: a
  page of at most max_patches patches has every row and column index below it; larger indices
  are clipped to the last row rather than read out of bounds), then `num_layers` EncoderLayers
  (0: embedding + norm only). Self-attention runs the kind the decoder's cross-attention runs
  with `attention`: its `bidirectional()` form (the same kind when it takes lengths, else
  `dense`).
  """

  def __init__(self, *, patch_size: int, max_patches: int, num_layers: int, d_model: int,
               num_heads: int, mlp_dim: int, dropout_rate: float = 0.0, dtype=jnp.float32,
               attention: AttentionSpec = DENSE, rngs: nnx.Rngs):
    if patch_size < 1 or max_patches < 1 or num_layers < 0:
      raise ValueError(f'PatchEncoder: patch_size={patch_size} and max_patches={max_patches} '
                       f'must be >= 1, num_layers={num_layers} >= 0')
    self.patch_size, self.max_patches, self.dtype = patch_size, max_patches, dtype
    self.patch_embed = Dense(3 * patch_size * patch_size, d_model, dtype=dtype,
                             param_dtype=jnp.float32, rngs=rngs)
    embed = lambda: Embed(max_patches, d_model, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.row_embed, self.col_embed = embed(), embed()
    self.attention = attention.bidirectional()
    self.layers = nnx.List([
        EncoderLayer(d_model, num_heads, mlp_dim, dropout_rate=dropout_rate, dtype=dtype,
                     attention=self.attention, rngs=rngs)
        for _ in range(num_layers)])
    self.final_norm = LayerNorm(d_model, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, features_BxPxF, lengths_B=None, dropout_key=None):
    """Patches [0, lengths_B) of each row are real (all P when None): only they are attended."""
    b, p, f = features_BxPxF.shape
    if f != patch_feature_dim(self.patch_size):
      raise ValueError(f'features_BxPxF: {f} features per patch, expected '
                       f'{patch_feature_dim(self.patch_size)} (2 + 3 * {self.patch_size}**2)')
    # Positions are read in float32, before any cast to the compute dtype (bfloat16 is exact
    # only up to 256).
    position_BxPx2 = jnp.clip(jnp.round(features_BxPxF[..., :2].astype(jnp.float32)), 0,
                              self.max_patches - 1).astype(jnp.int32)
    if lengths_B is None:
      lengths_B = jnp.full((b,), p, jnp.int32)
    pixels_BxPxF = standardize(features_BxPxF[..., 2:].astype(jnp.float32), lengths_B)
    x_BxPxD = (self.patch_embed(pixels_BxPxF.astype(self.dtype))
               + self.row_embed(position_BxPx2[..., 0]) + self.col_embed(position_BxPx2[..., 1]))
    n = len(self.layers)
    keys = [None] * n if dropout_key is None or not n else list(jax.random.split(dropout_key, n))
    for layer, key in zip(self.layers, keys, strict=True):
      x_BxPxD = layer(x_BxPxD, lengths_B, key)
    return self.final_norm(x_BxPxD)
