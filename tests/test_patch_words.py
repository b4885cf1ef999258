"""Patch words, the encoder's dense reading target: which BPE tokens of the visible text lie on
each patch, from the text blocks' boxes (prepare) to the batch's (patch, token) pairs, the model's
patch word head, its loss and the config and dataset checks that guard it."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from support import TINY, abstract_call, make_tiny, sds
from test_encoder import (
  PIXEL,
  PS,
  F,
  P,
  assert_config_error,
  pixel_config,
  pixel_record,
  write_dataset,
)

from phase1_jax import losses, specs
from phase1_jax.config import base_config
from phase1_jax.data import assemble, bpe, patches, pipeline, records
from phase1_jax.model.phase1 import valid_patches_first


def test_text_blocks_give_the_tokens_on_each_patch():
  """A 4 x 4 grid of 10 px patches over a 40 x 40 px screenshot: a title over the top row's
  first two patches, a word inside one patch, a line across a patch border; each block's BPE
  tokens pair with every patch its box touches, once each."""
  positions = np.stack(np.divmod(np.arange(16), 4), axis=1).astype(np.int16)
  boxes = [(0, 0, 20, 8), (31, 12, 5, 5), (0, 25, 40, 10), (0, 39, 1, 0)]
  on = patches.block_patches(boxes, positions, height=40, width=40)
  assert on == [[0, 1], [7], [8, 9, 10, 11, 12, 13, 14, 15], []]
  # The same boxes on a screenshot twice as tall: each patch row spans 20 px.
  assert patches.block_patches(boxes[:2], positions, height=80, width=40) == [[0, 1], [3]]
  assert patches.block_patches([], positions, height=40, width=40) == []
  tok = bpe.train(['<p >Hello world</p> <h1 >Big title</h1>'] * 20, 300)
  entry = {'text_blocks': [['Big title', [0, 1]], ['Hello', [7]], ['Hello world', [7, 8]]]}
  pairs, none = assemble._patch_words(tok, [entry, {'markup': 'features page'}])
  assert none is None
  want = {(p, t) for text, ps in entry['text_blocks'] for p in ps for t in tok.encode(text).ids}
  assert pairs.dtype == np.int32 and pairs.shape == (len(want), 2)
  assert [tuple(r) for r in pairs] == sorted(want)     # distinct, sorted
  assert patches.word_pairs([[1], []], [[], [5]]).shape == (0, 2)


def test_patch_word_pairs_are_padded_to_the_datasets_maximum():
  rec = pixel_record(np.random.default_rng(0), 6)
  rec['patch_words'] = np.array([[0, 5], [0, 9], [3, 5], [5, 2], [7, 1], [2, 64]], np.int32)
  ex = records.to_example(rec, max_seq_len=16, num_patches=4, max_patch_words=6)
  words = ex['patch_words']
  assert words.shape == (6, 2) and words.dtype == np.int32
  # Patch 5 is cut (num_patches 4) and 7 is past the page's 6 patches; token 64 stays (the loss
  # drops ids past the model's vocabulary).
  np.testing.assert_array_equal(words, [[0, 5], [0, 9], [3, 5], [2, 64], [-1, -1], [-1, -1]])
  got = records.decode_record(records.encode_record(rec))
  np.testing.assert_array_equal(got['patch_words'], rec['patch_words'])
  without = {k: v for k, v in rec.items() if k != 'patch_words'}
  assert (records.to_example(without, max_seq_len=16, num_patches=P,
                             max_patch_words=3)['patch_words'] == -1).all()
  assert 'patch_words' not in records.to_example(rec, max_seq_len=16, num_patches=P)


def _words_config(path):
  config = pixel_config(path, max_seq_len=16)
  config.loss.patch_words_weight, config.model.vocab_size = 1.0, 64
  return config


def _words_dataset(path, pages, **meta):
  write_dataset(path, {'input': 'pixels', 'patch_size': PS, 'max_patches': P, 'patch_words': True,
                       'element_open_tag_ids': [4, 5, 6, 7], **meta}, pages)


def test_pipeline_batches_hold_the_pairs_padded_to_max_patch_words(tmp_path):
  rng = np.random.default_rng(1)
  pages = [{**pixel_record(rng, n), 'patch_words': np.array([[0, 7], [n - 1, 3]], np.int32)}
           for n in (3, 11)]          # the second page's patch 10 is cut at P = 8
  _words_dataset(tmp_path, pages, max_patch_words=2)
  config = _words_config(tmp_path)
  data = specs.data_spec(config)
  assert data.patch_words
  assert specs.model_spec(config).patch_words and specs.loss_spec(config).patch_words_weight == 1
  source = pipeline.make_source(data, 'train')
  batch = next(pipeline.eval_batches(source, batch_size=2))[0]
  words = batch['patch_words']
  assert words.shape == (2, 2, 2) and words.dtype == np.int32
  np.testing.assert_array_equal(words, [[[0, 7], [2, 3]], [[0, 7], [-1, -1]]])
  config.loss.patch_words_weight = 0.0
  assert not specs.data_spec(config).patch_words
  assert not specs.model_spec(config).patch_words


@pytest.mark.parametrize('max_patch_words', [None, 1])
def test_max_patch_words_missing_or_too_small_is_one_line(max_patch_words, tmp_path):
  """dataset.json without max_patch_words: named when the source opens; a record holding more
  pairs than it says: named with the split and the record."""
  pages = [{**pixel_record(np.random.default_rng(2), 4),
            'patch_words': np.array([[0, 7], [1, 3]], np.int32)}]
  meta = {} if max_patch_words is None else {'max_patch_words': max_patch_words}
  _words_dataset(tmp_path, pages, **meta)
  data = specs.data_spec(_words_config(tmp_path))
  want = (r'dataset.json: no max_patch_words' if max_patch_words is None else
          r'train record 0 holds 2 patch words, more than the max_patch_words 1 of its '
          r'dataset.json')
  with pytest.raises(pipeline.DataError, match=want) as info:
    pipeline.make_source(data, 'train')[0]
  assert '\n' not in str(info.value)


def test_patch_words_weight_needs_a_dataset_with_patch_words(tmp_path):
  """One line naming dataset.json and the weight, before anything compiles."""
  write_dataset(tmp_path, {'input': 'pixels', 'patch_size': PS, 'max_patches': P,
                           'patch_labels': True})
  with pytest.raises(pipeline.DataError, match=r'dataset.json: its records hold no patch words, '
                     r'which loss.patch_words_weight > 0') as info:
    pipeline.make_source(specs.data_spec(_words_config(tmp_path)), 'train')
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('value', [1.0, -1.0])
def test_patch_words_weight_only_with_pixels_and_not_negative(value, tmp_path):
  config = base_config()
  config.loss.patch_words_weight = value
  assert_config_error(config, 'loss.patch_words_weight')
  if value < 0:
    write_dataset(tmp_path, {'input': 'pixels', 'patch_size': PS, 'max_patches': P})
    config = pixel_config(tmp_path)
    config.loss.patch_words_weight = value
    assert_config_error(config, 'loss.patch_words_weight')


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_patch_word_head_shape_and_dtype(dtype):
  b, t = 2, 8
  args = sds((b, P, F)), sds((b, P), bool), sds((b, t), jnp.int32)
  _, out = abstract_call(lambda: make_tiny(**PIXEL, patch_words=True, dtype=dtype), *args)
  chex.assert_shape(out['patch_word_logits'], (b, P, TINY['vocab_size']))
  chex.assert_type(out['patch_word_logits'], jnp.float32)
  _, plain = abstract_call(lambda: make_tiny(**PIXEL), *args)
  assert 'patch_word_logits' not in plain
  _, features = abstract_call(lambda: make_tiny(patch_words=True),
                              sds((b, P, TINY['feature_dim'])), *args[1:])
  assert 'patch_word_logits' not in features     # the head reads the patch encoder's output


def _random_pairs(rng, b, p, v, k):
  """Random logits, a patch mask, a page mask with one padding page, distinct (patch, token)
  pairs (some with token v: out of the vocabulary) and the multi-hot [b, p, v] they stand for."""
  logits = (3 * rng.standard_normal((b, p, v))).astype(np.float32)
  mask = rng.random((b, p)) < 0.6
  mask[:, 0] = True
  page_mask = np.array([True] * (b - 1) + [False])
  pairs = np.full((b, k, 2), -1, np.int32)
  dense = np.zeros((b, p, v))
  for i in range(b):
    cells = rng.permutation(p * (v + 1))[:rng.integers(1, k + 1)]
    pairs[i, :len(cells)] = np.stack(np.divmod(cells, v + 1), axis=1)
    for patch, token in pairs[i, :len(cells)]:
      if token < v:
        dense[i, patch, token] = 1
  return logits, mask, page_mask, pairs, dense


def _dense_reference(dense, mask, page_mask, form):
  """The loss from the [B, P, V] multi-hot, in the model's order (valid patches first)."""
  def loss(logits_BxPxV):
    targets, lengths = valid_patches_first(jnp.asarray(dense, jnp.float32), jnp.asarray(mask))
    real = (jnp.arange(mask.shape[1])[None] < lengths[:, None]) & jnp.asarray(page_mask)[:, None]
    if form == 'sigmoid':
      per_patch = optax.sigmoid_binary_cross_entropy(logits_BxPxV, targets).mean(-1)
    else:
      count = targets.sum(-1)
      real = real & (count > 0)
      per_patch = optax.softmax_cross_entropy(logits_BxPxV,
                                              targets / jnp.maximum(count, 1)[..., None])
    return (per_patch * real).sum() / real.sum()
  return loss


@pytest.mark.parametrize('form', ['softmax', 'sigmoid'])
def test_patch_word_loss_from_pairs_equals_the_dense_reference(form):
  """Both forms from the pairs equal the dense multi-hot's loss in value and gradient: the logits
  are in the model's order (valid patches first), the pairs in the batch's. Pairs on padding
  patches, past the vocabulary or of padding pages count nowhere; (-1, -1) rows pad."""
  rng = np.random.default_rng()
  logits, mask, page_mask, pairs, dense = _random_pairs(rng, 3, 6, 5, 12)
  args = jnp.asarray(pairs), jnp.asarray(mask), jnp.asarray(page_mask)
  got, grad = jax.value_and_grad(
      lambda z: losses.patch_word_loss(z, *args, form=form))(jnp.asarray(logits))
  assert got.dtype == jnp.float32
  reference = _dense_reference(dense, mask, page_mask, form)
  np.testing.assert_allclose(grad, jax.grad(reference)(jnp.asarray(logits)), atol=1e-7)
  terms = []
  for i in range(2):
    valid = dense[i][mask[i]]                    # valid patches first, in order
    z = logits[i, :len(valid)].astype(np.float64)
    if form == 'sigmoid':
      bce = np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0) - z * valid
      terms += list(bce.mean(-1))
    else:
      shown = valid.sum(-1) > 0
      lse = np.log(np.exp(z).sum(-1))
      terms += list((lse - (z * valid).sum(-1) / np.maximum(valid.sum(-1), 1))[shown])
  np.testing.assert_allclose(float(got), np.mean(terms), rtol=1e-5)


def test_patch_words_form_is_checked():
  config = base_config()
  config.loss.patch_words_form = 'hinge'
  assert_config_error(config, 'loss.patch_words_form')
