"""Patch words, the encoder's dense reading target: which BPE tokens of the visible text lie on
each patch, from the text blocks' boxes (prepare) to the multi-hot batch field, the model's patch
word head, its loss and the config and dataset checks that guard it."""
from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
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


def test_patch_word_targets_are_a_multi_hot_per_patch():
  rec = pixel_record(np.random.default_rng(0), 6)
  rec['patch_words'] = np.array([[0, 5], [0, 9], [3, 5], [5, 2], [7, 1], [2, 64]], np.int32)
  v = 64
  ex = records.to_example(rec, max_seq_len=16, num_patches=4, patch_word_vocab=v)
  words = ex['patch_words']
  assert words.shape == (4, v) and words.dtype == np.float32
  want = np.zeros((4, v), np.float32)
  want[0, [5, 9]] = want[3, 5] = 1     # patch 5 is cut (num_patches 4); 7 and id 64 are out
  np.testing.assert_array_equal(words, want)
  got = records.decode_record(records.encode_record(rec))
  np.testing.assert_array_equal(got['patch_words'], rec['patch_words'])
  without = {k: v for k, v in rec.items() if k != 'patch_words'}
  assert not records.to_example(without, max_seq_len=16, num_patches=P,
                                patch_word_vocab=v)['patch_words'].any()
  assert 'patch_words' not in records.to_example(rec, max_seq_len=16, num_patches=P)


def _words_config(path):
  config = pixel_config(path, max_seq_len=16)
  config.loss.patch_words_weight, config.model.vocab_size = 1.0, 64
  return config


def test_pipeline_batches_hold_patch_words_of_the_model_vocab(tmp_path):
  rng = np.random.default_rng(1)
  pages = [{**pixel_record(rng, n), 'patch_words': np.array([[0, 7], [n - 1, 3]], np.int32)}
           for n in (3, 11)]
  write_dataset(tmp_path, {'input': 'pixels', 'patch_size': PS, 'max_patches': P,
                           'patch_words': True, 'element_open_tag_ids': [4, 5, 6, 7]}, pages)
  config = _words_config(tmp_path)
  data = specs.data_spec(config)
  assert data.patch_words == config.model.vocab_size
  assert specs.model_spec(config).patch_words and specs.loss_spec(config).patch_words_weight == 1
  source = pipeline.make_source(data, 'train')
  batch = next(pipeline.eval_batches(source, batch_size=2))[0]
  words = batch['patch_words']
  assert words.shape == (2, P, config.model.vocab_size) and words.dtype == np.float32
  assert words.sum() == 3 and words[0, 0, 7] == words[0, 2, 3] == words[1, 0, 7] == 1
  config.loss.patch_words_weight = 0.0
  assert specs.data_spec(config).patch_words == 0
  assert not specs.model_spec(config).patch_words


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


def test_patch_word_loss_is_the_mean_bce_of_valid_patches():
  """Sigmoid cross-entropy per (patch, token), averaged over tokens and the valid patches of real
  pages; the logits are in the model's order (valid patches first), the targets the batch's."""
  rng = np.random.default_rng(3)
  b, p, v = 3, 5, 4
  logits = rng.standard_normal((b, p, v)).astype(np.float32)
  targets = (rng.random((b, p, v)) < 0.3).astype(np.float32)
  mask = rng.random((b, p)) < 0.6
  mask[:, 0] = True
  page_mask = np.array([True, True, False])
  got = losses.patch_word_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask),
                               jnp.asarray(page_mask))
  assert got.dtype == jnp.float32
  terms = []
  for i in range(2):
    valid = targets[i][mask[i]]                    # valid patches first, in order
    z = logits[i, :len(valid)].astype(np.float64)
    bce = np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0) - z * valid
    terms += list(bce.mean(-1))
  np.testing.assert_allclose(float(got), np.mean(terms), rtol=1e-5)
