"""Autoregressive decoding: greedy, sampling (temperature, top-k, top-p) and beam search, with a
KV cache or by recomputation, plus the slow reference the fast paths must equal.

Every strategy runs as one `lax.while_loop` of fixed shapes (no recompilation per length) that
stops when every row has finished (EOS) or at `max_len`. A decoder is driven through a
`Stepper`: `step(tokens_B, pos, state) -> (detail_logits_BxV, state)` reads the token at
position `pos` (BOS at 0) and returns the logits for position `pos`'s output. `cached_stepper`
keeps per-layer-application KV caches in the attention kind's layout (model/kv_cache.py: a ring
buffer of the last `window_size` keys for `window`) and the memory's cross-attention K/V,
computed once; `recompute_stepper` reruns the whole model on the prefix (the definition).
Decoded pages never contain PAD or BOS; after its EOS a row holds PAD.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from phase1_jax.model.phase1 import Phase1Decoder

STRATEGIES = ('greedy', 'sample', 'beam')


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """How to decode (hashable: a static argument of the jitted decoder)."""
  max_len: int
  strategy: str = 'greedy'
  temperature: float = 1.0     # sample: logits / temperature
  top_k: int = 0               # sample: keep the k most likely tokens (0: all)
  top_p: float = 1.0           # sample: keep the smallest set with probability >= top_p
  beam_size: int = 4           # beam
  length_penalty: float = 0.6  # beam: score = log_prob / ((5 + length) / 6) ** length_penalty
  candidates: int = 8          # mbr (inference/mbr.py, on the host): pages decoded, one kept


@dataclasses.dataclass(frozen=True)
class TokenIds:
  bos: int
  eos: int
  pad: int


class Stepper(NamedTuple):
  step: Callable[..., tuple[jax.Array, Any]]   # (tokens_B, pos, state) -> (logits_BxV, state)
  state: Any
  reorder: Callable[[Any, jax.Array], Any]     # (state, rows_B) -> state with rows taken


def cached_stepper(model: Phase1Decoder, features_BxPxF, feature_mask_BxP, max_len: int):
  def step(tokens_B, pos, state):
    detail_BxV, _, state = model.decode_step(tokens_B, pos, state, feature_mask_BxP)
    return detail_BxV, state

  def reorder(state, rows_B):
    # Caches carry the batch on axis 1 (axis 0: layer application); memory K/V are the same
    # for every beam of a page, and beams never move across pages, so they stay.
    return {**state, 'cache': jax.tree.map(lambda x: x[:, rows_B], state['cache'])}

  return Stepper(step, model.init_decode_state(features_BxPxF, max_len, feature_mask_BxP),
                 reorder)


def recompute_stepper(model: Phase1Decoder, features_BxPxF, feature_mask_BxP, max_len: int,
                      pad_id: int):
  """The full forward pass on [B, max_len] inputs at every position (fixed shapes)."""
  def step(tokens_B, pos, inputs_BxT):
    inputs_BxT = jax.lax.dynamic_update_slice_in_dim(inputs_BxT, tokens_B[:, None], pos, axis=1)
    detail_BxTxV = model(features_BxPxF, feature_mask_BxP, inputs_BxT)['detail_logits']
    return jax.lax.dynamic_index_in_dim(detail_BxTxV, pos, axis=1, keepdims=False), inputs_BxT

  inputs_BxT = jnp.full((features_BxPxF.shape[0], max_len), pad_id, jnp.int32)
  return Stepper(step, inputs_BxT, lambda inputs_BxT, rows_B: inputs_BxT[rows_B])


def _allowed_logits(logits_BxV, ids: TokenIds):
  """float32 logits with PAD and BOS impossible (a page never contains them)."""
  never_V = jnp.zeros(logits_BxV.shape[-1], bool).at[jnp.array([ids.bos, ids.pad])].set(True)
  return jnp.where(never_V, -jnp.inf, logits_BxV.astype(jnp.float32))


def filter_logits(logits_BxV, *, temperature: float, top_k: int, top_p: float):
  """Temperature, then top-k, then nucleus (top-p) filtering: removed tokens get -inf."""
  logits_BxV = logits_BxV / temperature
  if 0 < top_k < logits_BxV.shape[-1]:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep a token while the mass before it is < top_p: the most likely one always stays.
    keep_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < top_p
    cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
  return logits_BxV


def _sample_loop(stepper: Stepper, batch: int, s: DecodeSettings, ids: TokenIds, rng):
  """Greedy (argmax; lowest id on ties) or sampled decoding: tokens_BxT, log_prob_B (the model's
  log-probability of each row's tokens up to and including EOS, at temperature 1)."""
  def choose(logits_BxV, pos):
    if s.strategy == 'greedy':
      return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits_BxV, temperature=s.temperature, top_k=s.top_k,
                             top_p=s.top_p)
    return jax.random.categorical(jax.random.fold_in(rng, pos), filtered).astype(jnp.int32)

  def cond(carry):
    pos, _, done_B, *_ = carry
    return (pos < s.max_len) & ~jnp.all(done_B)

  def body(carry):
    pos, prev_B, done_B, tokens_BxT, log_prob_B, state = carry
    logits_BxV, state = stepper.step(prev_B, pos, state)
    logits_BxV = _allowed_logits(logits_BxV, ids)
    next_B = jnp.where(done_B, ids.pad, choose(logits_BxV, pos))
    token_log_prob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV), next_B[:, None], 1)
    log_prob_B = log_prob_B + jnp.where(done_B, 0.0, token_log_prob_B[:, 0])
    tokens_BxT = jax.lax.dynamic_update_slice_in_dim(tokens_BxT, next_B[:, None], pos, axis=1)
    return pos + 1, next_B, done_B | (next_B == ids.eos), tokens_BxT, log_prob_B, state

  init = (jnp.int32(0), jnp.full((batch,), ids.bos, jnp.int32), jnp.zeros((batch,), bool),
          jnp.full((batch, s.max_len), ids.pad, jnp.int32), jnp.zeros((batch,), jnp.float32),
          stepper.state)
  _, _, _, tokens_BxT, log_prob_B, _ = jax.lax.while_loop(cond, body, init)
  return tokens_BxT, log_prob_B


def _length_penalty(length, alpha: float):
  """GNMT's ((5 + length) / 6) ** alpha."""
  return ((5.0 + length) / 6.0) ** alpha


def _beam_loop(stepper: Stepper, batch: int, s: DecodeSettings, ids: TokenIds):
  """Beam search over `stepper` whose rows are batch x beam (row b * W + w). Keeps the W best
  live prefixes and the W best finished pages per page; a finished page scores
  log_prob / length_penalty(length incl. EOS). Stops when no live prefix can still beat the
  worst finished page, or at max_len. Returns the best page per row and its score."""
  w, t = s.beam_size, s.max_len
  neg = jnp.float32(-jnp.inf)
  take = lambda x, beam_BxK: jnp.take_along_axis(x, beam_BxK.reshape(
      beam_BxK.shape + (1,) * (x.ndim - 2)), axis=1)

  def cond(carry):
    pos, _, live_log_prob_BxW, _, finished_BxW, _, _ = carry
    best_live_B = live_log_prob_BxW.max(-1) / _length_penalty(t, s.length_penalty)
    done_B = finished_BxW.min(-1) >= best_live_B   # -inf while a finished slot is empty
    return (pos < t) & ~jnp.all(done_B)

  def body(carry):
    pos, live_BxWxT, live_log_prob_BxW, finished_tokens_BxWxT, finished_BxW, prev_R, state = carry
    logits_RxV, state = stepper.step(prev_R, pos, state)
    log_probs_BxWxV = jax.nn.log_softmax(_allowed_logits(logits_RxV, ids)).reshape(batch, w, -1)
    vocab = log_probs_BxWxV.shape[-1]
    candidates_BxWV = (live_log_prob_BxW[..., None] + log_probs_BxWxV).reshape(batch, -1)
    # 2W candidates: even if W of them end in EOS, W live ones remain.
    scores_Bx2W, flat_Bx2W = jax.lax.top_k(candidates_BxWV, 2 * w)
    beam_Bx2W, token_Bx2W = flat_Bx2W // vocab, (flat_Bx2W % vocab).astype(jnp.int32)
    seqs_Bx2WxT = take(live_BxWxT, beam_Bx2W).at[:, :, pos].set(token_Bx2W)
    ends_Bx2W = token_Bx2W == ids.eos
    # Finished: the old ones and the candidates that end here, best W kept.
    ended_Bx2W = jnp.where(ends_Bx2W, scores_Bx2W / _length_penalty(pos + 1, s.length_penalty),
                           neg)
    finished_BxW, keep_BxW = jax.lax.top_k(jnp.concatenate([finished_BxW, ended_Bx2W], 1), w)
    finished_tokens_BxWxT = take(jnp.concatenate([finished_tokens_BxWxT, seqs_Bx2WxT], 1),
                                 keep_BxW)
    # Live: the best W candidates that did not end.
    live_log_prob_BxW, pick_BxW = jax.lax.top_k(jnp.where(ends_Bx2W, neg, scores_Bx2W), w)
    live_BxWxT = take(seqs_Bx2WxT, pick_BxW)
    parent_BxW = jnp.take_along_axis(beam_Bx2W, pick_BxW, 1)
    rows_R = (jnp.arange(batch)[:, None] * w + parent_BxW).reshape(-1)
    state = stepper.reorder(state, rows_R)
    prev_R = jnp.take_along_axis(token_Bx2W, pick_BxW, 1).reshape(-1)
    return (pos + 1, live_BxWxT, live_log_prob_BxW, finished_tokens_BxWxT, finished_BxW, prev_R,
            state)

  # One live beam per page at the start (the others at -inf), so the first step's W best
  # candidates are W different tokens, not W copies of one.
  live_log_prob_BxW = jnp.full((batch, w), neg).at[:, 0].set(0.0)
  pages_BxWxT = jnp.full((batch, w, t), ids.pad, jnp.int32)
  init = (jnp.int32(0), pages_BxWxT, live_log_prob_BxW, pages_BxWxT, jnp.full((batch, w), neg),
          jnp.full((batch * w,), ids.bos, jnp.int32), stepper.state)
  _, live_BxWxT, live_log_prob_BxW, finished_tokens_BxWxT, finished_BxW, _, _ = (
      jax.lax.while_loop(cond, body, init))
  # A page with no finished beam (max_len reached first) takes its best live prefix.
  none_B = finished_BxW[:, 0] == neg
  tokens_BxT = jnp.where(none_B[:, None], live_BxWxT[:, 0], finished_tokens_BxWxT[:, 0])
  live_score_B = live_log_prob_BxW[:, 0] / _length_penalty(t, s.length_penalty)
  return tokens_BxT, jnp.where(none_B, live_score_B, finished_BxW[:, 0])


def decode_tokens(model: Phase1Decoder, features_BxPxF, feature_mask_BxP, *,
                  settings: DecodeSettings, ids: TokenIds, rng=None, use_cache: bool = True):
  """tokens_BxT (T = settings.max_len) and a score per row: the log-probability for greedy and
  sampling, the length-penalised log-probability for beam search. `rng` (a PRNG key) is
  needed for sampling; the same key gives the same pages."""
  s = settings
  if s.strategy == 'mbr':
    raise ValueError("strategy='mbr' chooses among decoded pages on the host: inference/mbr.py")
  if s.strategy not in STRATEGIES:
    raise ValueError(f'strategy={s.strategy!r}: must be one of {", ".join(STRATEGIES)}')
  if s.strategy == 'sample' and rng is None:
    raise ValueError('rng: sampling needs a PRNG key')
  batch = features_BxPxF.shape[0]
  if s.strategy == 'beam':
    repeat = lambda x: jnp.repeat(x, s.beam_size, axis=0)
    features_BxPxF, feature_mask_BxP = repeat(features_BxPxF), repeat(feature_mask_BxP)
  if use_cache:
    stepper = cached_stepper(model, features_BxPxF, feature_mask_BxP, s.max_len)
  else:
    stepper = recompute_stepper(model, features_BxPxF, feature_mask_BxP, s.max_len, ids.pad)
  if s.strategy == 'beam':
    return _beam_loop(stepper, batch, s, ids)
  return _sample_loop(stepper, batch, s, ids, rng)


def decoder_inputs(tokens_BxT, ids: TokenIds):
  """The inputs that produce a decoded page: BOS + its tokens up to EOS, PAD after EOS."""
  inputs_BxT = jnp.concatenate([jnp.full_like(tokens_BxT[:, :1], ids.bos), tokens_BxT[:, :-1]], 1)
  return jnp.where(jnp.cumsum(inputs_BxT == ids.eos, axis=1) > 0, ids.pad, inputs_BxT)


def annotate(model: Phase1Decoder, features_BxPxF, feature_mask_BxP, tokens_BxT, ids: TokenIds):
  """The semantic class of each decoded token (semantic_BxT, int32) and the element classifier's
  probabilities reading the decoded page (element_probs_BxE): one forward pass on it."""
  outputs = model(features_BxPxF, feature_mask_BxP, decoder_inputs(tokens_BxT, ids))
  return (jnp.argmax(outputs['semantic_logits'], -1).astype(jnp.int32),
          jax.nn.sigmoid(outputs['element_logits']))


def generate(model: Phase1Decoder, features_BxPxF, feature_mask_BxP, *,
             settings: DecodeSettings, ids: TokenIds, rng=None) -> dict:
  """Pages with their annotations: tokens_BxT, score_B, semantic_BxT, element_probs_BxE."""
  tokens_BxT, score_B = decode_tokens(model, features_BxPxF, feature_mask_BxP,
                                      settings=settings, ids=ids, rng=rng)
  semantic_BxT, element_probs_BxE = annotate(model, features_BxPxF, feature_mask_BxP,
                                             tokens_BxT, ids)
  return {'tokens': tokens_BxT, 'score': score_B, 'semantic': semantic_BxT,
          'element_probs': element_probs_BxE}


def greedy_decode(model: Phase1Decoder, features_BxPxF, feature_mask_BxP, *, max_len: int,
                  bos_id: int, eos_id: int, pad_id: int, use_cache: bool = True):
  """Greedy markup for each page: tokens_BxT (T = max_len), PAD after each row's EOS."""
  return decode_tokens(model, features_BxPxF, feature_mask_BxP,
                       settings=DecodeSettings(max_len=max_len),
                       ids=TokenIds(bos_id, eos_id, pad_id), use_cache=use_cache)[0]


def greedy_decode_reference(model: Phase1Decoder, features_BxPxF, feature_mask_BxP, *,
                            max_len: int, bos_id: int, eos_id: int, pad_id: int):
  """The slow definition: a Python loop rerunning the full model on the prefix for each token."""
  b = features_BxPxF.shape[0]
  ids = TokenIds(bos_id, eos_id, pad_id)
  inputs_BxT = jnp.full((b, max_len), pad_id, jnp.int32).at[:, 0].set(bos_id)
  tokens_BxT = jnp.full((b, max_len), pad_id, jnp.int32)
  done_B = jnp.zeros((b,), bool)
  for pos in range(max_len):
    logits_BxV = model(features_BxPxF, feature_mask_BxP, inputs_BxT)['detail_logits'][:, pos]
    next_B = jnp.argmax(_allowed_logits(logits_BxV, ids), axis=-1).astype(jnp.int32)
    next_B = jnp.where(done_B, pad_id, next_B)
    tokens_BxT = tokens_BxT.at[:, pos].set(next_B)
    if pos + 1 < max_len:
      inputs_BxT = inputs_BxT.at[:, pos + 1].set(next_B)
    done_B = done_B | (next_B == eos_id)
  return tokens_BxT
