"""Phase1Decoder: feature projection (or patch encoder) -> shared backbone -> dual heads + element
classifier."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from phase1_jax.model import kv_cache
from phase1_jax.model.attention import prefix_mask
from phase1_jax.model.decoder import SharedDecoderBackbone
from phase1_jax.model.encoder import PatchEncoder, patch_feature_dim
from phase1_jax.model.heads import DualGenerationHeads, ElementTypeClassifier
from phase1_jax.model.layers import Dense, Embed, LayerNorm
from phase1_jax.model.spec import ModelSpec


class Phase1Decoder(nnx.Module):
  """Reads fused page features and writes markup, per-token semantics and element types; its
  structure is `spec` (model/spec.py).

  __call__(features_BxPxF, feature_mask_BxP, inputs_BxT, dropout_key=None) -> dict with
    detail_logits_BxTxV, semantic_logits_BxTxC, element_logits_BxE (all float32). With
    detail_logits=False: detail_hidden_BxTxD and detail_weight_VxD (+ detail_bias_V if untied)
    replace the detail logits: what training's loss takes (detail_loss.detail_terms).
  A page's tokens end at its first pad_id (the data pipeline pads only at the end): later
  positions are masked everywhere (attention keys, pooling). Masked patches may sit anywhere;
  the forward pass moves them behind the valid ones (attention over the memory does not depend
  on its order), so both masks reach the backbone as lengths, which cuDNN's fused attention
  takes without a mask tensor. Every page needs a valid patch (data.prepare rejects empty
  feature arrays): with none, cuDNN's output is undefined where `dense` averages uniformly.

  patch_size > 0: the input is a screenshot's patches in the flattened-patches layout of
  encoder.py (F = 2 + 3 * patch_size**2), read by a PatchEncoder (`encoder_layers` layers,
  position tables of `max_patches`) in place of the feature projection; its self-attention sees
  the valid patches only, in training and in decoding alike. With `patch_labels`, a linear
  patch head on the memory adds patch_logits_BxPx(C+E+2) (valid patches first: see
  valid_patches_first), which losses.patch_label_loss scores; with `patch_words`, another adds
  patch_word_logits_BxPxV (losses.patch_word_loss). patch_size = 0: fused features
  through one Dense (`feature_proj`).
  """

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    s, dtype = spec, spec.compute_dtype
    self.pad_id, self.dtype = s.pad_id, dtype
    embed = lambda n: Embed(n, s.d_model, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.token_embed, self.position_embed = embed(s.vocab_size), embed(s.max_seq_len)
    norm = lambda: LayerNorm(s.d_model, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    if s.patch_size:
      if s.feature_dim != patch_feature_dim(s.patch_size):
        raise ValueError(f'feature_dim={s.feature_dim}: must be 2 + 3 * patch_size**2 = '
                         f'{patch_feature_dim(s.patch_size)} for patch_size={s.patch_size}')
      self.patch_encoder = PatchEncoder(
          patch_size=s.patch_size, max_patches=s.max_patches, num_layers=s.encoder_layers,
          d_model=s.d_model, num_heads=s.num_heads, mlp_dim=s.mlp_dim,
          dropout_rate=s.dropout_rate, dtype=dtype, attention=s.attention, rngs=rngs)
    else:
      self.patch_encoder = None
      self.feature_proj = Dense(s.feature_dim, s.d_model, dtype=dtype, param_dtype=jnp.float32,
                                rngs=rngs)
      self.memory_norm = norm()
    self.final_norm = norm()
    self.dropout = nnx.Dropout(s.dropout_rate)
    self.backbone = SharedDecoderBackbone(
        num_layers=s.num_layers, num_unique_layers=s.num_unique_layers, scan=s.scan_layers,
        remat=s.remat, remat_policy=s.remat_policy, d_model=s.d_model, num_heads=s.num_heads,
        mlp_dim=s.mlp_dim, dropout_rate=s.dropout_rate, dtype=dtype, attention=s.attention,
        rngs=rngs)
    self.heads = DualGenerationHeads(s.d_model, s.vocab_size, s.num_semantic_classes,
                                     tied=s.tie_detail_head, dtype=dtype, rngs=rngs)
    self.element_classifier = ElementTypeClassifier(s.d_model, s.num_element_types, dtype=dtype,
                                                    rngs=rngs)
    # Training signal for the encoder: each patch's section class and element type (+ 'none'),
    # from the rendered boxes (losses.patch_label_loss).
    self.patch_head = (Dense(s.d_model, s.num_semantic_classes + s.num_element_types + 2,
                             dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
                       if s.patch_labels and self.patch_encoder is not None else None)
    # And a dense reading target: which BPE tokens of the visible text lie on each patch.
    self.patch_word_head = (Dense(s.d_model, s.vocab_size, dtype=dtype, param_dtype=jnp.float32,
                                  rngs=rngs)
                            if s.patch_words and self.patch_encoder is not None else None)

  def encode_memory(self, features_BxPxF, lengths_B=None, dropout_key=None):
    """The decoder's memory [batch, patches, d_model]: projected, normalized features, or the
    patch encoder's output. lengths_B (patch encoder only): patches [0, length) are real and
    the others are never attended (None: all are real)."""
    if self.patch_encoder is not None:
      return self.patch_encoder(features_BxPxF, lengths_B, dropout_key)
    return self.memory_norm(self.feature_proj(features_BxPxF.astype(self.dtype)))

  def __call__(self, features_BxPxF, feature_mask_BxP, inputs_BxT, dropout_key=None, *,
               detail_logits: bool = True):
    token_lengths_B = prefix_lengths(inputs_BxT != self.pad_id)
    t = inputs_BxT.shape[1]
    token_mask_BxT = prefix_mask(token_lengths_B, t)
    x_BxTxD = self.token_embed(inputs_BxT) + self.position_embed(jnp.arange(t))[None]
    # A third key for the patch encoder only: the features model draws the masks it always did.
    num_keys = 2 if self.patch_encoder is None else 3
    keys = ((None,) * num_keys if dropout_key is None
            else jax.random.split(dropout_key, num_keys))
    x_BxTxD = self.dropout(x_BxTxD, deterministic=dropout_key is None, rngs=keys[0])
    features_BxPxF, memory_lengths_B = valid_patches_first(features_BxPxF, feature_mask_BxP)
    memory_BxPxD = self.encode_memory(features_BxPxF, memory_lengths_B,
                                      keys[2] if num_keys == 3 else None)
    h_BxTxD = self.backbone(x_BxTxD, token_lengths_B, memory_BxPxD, memory_lengths_B, keys[1])
    h_BxTxD = self.final_norm(h_BxTxD)
    outputs = {'element_logits': self.element_classifier(h_BxTxD, token_mask_BxT)}
    if self.patch_head is not None:   # in memory order: valid patches first
      outputs['patch_logits'] = self.patch_head(memory_BxPxD).astype(jnp.float32)
    if self.patch_word_head is not None:   # the same order
      outputs['patch_word_logits'] = self.patch_word_head(memory_BxPxD).astype(jnp.float32)
    if detail_logits:
      outputs['detail_logits'], outputs['semantic_logits'] = self.heads(
          h_BxTxD, self.token_embed.embedding[...])
      return outputs
    # For the training loss: the states and the head's weights; the loss makes the logits.
    weight_VxD, bias_V = self.heads.detail_weights(self.token_embed.embedding[...], self.dtype)
    outputs.update(detail_hidden=h_BxTxD, detail_weight=weight_VxD,
                   semantic_logits=self.heads.semantic_logits(h_BxTxD))
    if bias_V is not None:
      outputs['detail_bias'] = bias_V
    return outputs

  def init_decode_state(self, features_BxPxF, max_len: int, feature_mask_BxP=None):
    """What decoding keeps per sequence: memory K/V per unique layer (computed once), and an
    empty self-attention KV cache per layer application in the attention kind's layout.

    With a patch encoder, the memory is encoded as in __call__ (valid patches first, the others
    never attended; feature_mask_BxP None: all valid) and the state also holds `memory_mask`,
    the mask of that order, which decode_step then uses in place of its feature_mask_BxP."""
    extra = {}
    if self.patch_encoder is None:
      memory_BxPxD = self.encode_memory(features_BxPxF)
    else:
      b, p, _ = features_BxPxF.shape
      if feature_mask_BxP is None:
        feature_mask_BxP = jnp.ones((b, p), bool)
      features_BxPxF, lengths_B = valid_patches_first(features_BxPxF, feature_mask_BxP)
      memory_BxPxD = self.encode_memory(features_BxPxF, lengths_B)
      extra['memory_mask'] = prefix_mask(lengths_B, p)
    memory_kv = self.backbone.memory_kv(memory_BxPxD)
    _, b, _, n, h = memory_kv[0].shape
    cache = kv_cache.init(self.spec.attention, num_applications=self.backbone.num_layers,
                          batch=b, max_len=max_len, num_heads=n, head_dim=h, dtype=self.dtype)
    return {'memory_kv': memory_kv, 'cache': cache, **extra}

  def decode_step(self, tokens_B, pos, decode_state, feature_mask_BxP):
    """Logits for the position after `tokens_B` at position `pos`: (detail_BxV, semantic_BxC,
    new decode_state). Equals __call__ on the whole prefix at position pos (tested), given the
    feature_mask_BxP init_decode_state had."""
    x_Bx1xD = self.token_embed(tokens_B[:, None]) + self.position_embed(pos)[None, None]
    memory_mask_BxP = decode_state.get('memory_mask', feature_mask_BxP)
    h_Bx1xD, cache = self.backbone.decode_step(x_Bx1xD, decode_state['cache'], pos,
                                               decode_state['memory_kv'], memory_mask_BxP)
    detail, semantic = self.heads(self.final_norm(h_Bx1xD), self.token_embed.embedding[...])
    return detail[:, 0], semantic[:, 0], {**decode_state, 'cache': cache}


def prefix_lengths(mask_BxT):
  """Length of each row's leading run of True: [batch] int32."""
  return jnp.cumprod(mask_BxT, axis=-1, dtype=jnp.int32).sum(axis=-1, dtype=jnp.int32)


def valid_patches_first(features_BxPx_, feature_mask_BxP):
  """(features, or any per-patch array, with each row's valid patches first, in their order;
  number valid [batch])."""
  order_BxP = jnp.argsort(~feature_mask_BxP, axis=-1, stable=True)
  order = order_BxP.reshape(order_BxP.shape + (1,) * (features_BxPx_.ndim - 2))
  features_BxPx_ = jnp.take_along_axis(features_BxPx_, order, axis=1)
  return features_BxPx_, feature_mask_BxP.sum(axis=-1, dtype=jnp.int32)


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def parameter_report(model: Phase1Decoder) -> dict:
  """Parameters of this model against 'no sharing' (one block per application) and against
  'two separate decoders' (one unshared decoder per generation head, as without a shared trunk)."""
  num_layers, num_unique_layers = model.spec.num_layers, model.spec.num_unique_layers
  total = count_params(model)
  backbone = count_params(model.backbone)
  per_block = backbone // num_unique_layers
  no_sharing = total + per_block * (num_layers - num_unique_layers)
  # A second full decoder for the semantic head: its own embeddings, projection, norms, blocks.
  heads_and_classifier = count_params(model.heads) + count_params(model.element_classifier)
  trunk_unshared = no_sharing - heads_and_classifier
  two_decoders = 2 * trunk_unshared + heads_and_classifier
  return {
      'params': total,
      'backbone_params': backbone,
      'params_no_sharing': no_sharing,
      'params_two_decoders': two_decoders,
      'reduction_vs_no_sharing': 1 - total / no_sharing,
      'reduction_vs_two_decoders': 1 - total / two_decoders,
  }
