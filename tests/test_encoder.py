"""Pixel input: the patch encoder, the pixel Phase1Decoder (masking, gradients, KV-cached decoding),
pixel records and their examples, and the config fields that select them."""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import REPO, SEQ, TINY, JittedModel, make_tiny, materialize
from test_decoding import BOS, NEVER, PAD, cached_decode, reference_decode

from phase1_jax import config as config_lib
from phase1_jax import specs
from phase1_jax.config import ConfigError, base_config
from phase1_jax.config_validation import validate
from phase1_jax.data import pipeline, records
from phase1_jax.inference import decoding
from phase1_jax.model import cpu_attention
from phase1_jax.model.attention import AttentionSpec
from phase1_jax.model.encoder import PatchEncoder, patch_feature_dim, standardize
from phase1_jax.model.phase1 import Phase1Decoder

PS, ROWS, COLS = 2, 2, 4                 # patches of 2 x 2 px on a 2 x 4 grid
P, F = ROWS * COLS, patch_feature_dim(PS)
B, D = 3, 32
ENC = dict(patch_size=PS, max_patches=P, d_model=D, num_heads=4, mlp_dim=64, dropout_rate=0.2)
PIXEL = dict(feature_dim=F, patch_size=PS, max_patches=P, encoder_layers=2)
KINDS = ['dense', 'dot_product'] + (['fused_cpu'] if cpu_attention.compiler_available() else [])


def flattened_patches(rng, batch=B):
  """Random pages in the flattened-patches layout: row, column, pixels in [0, 1]."""
  rows, cols = np.meshgrid(np.arange(ROWS), np.arange(COLS), indexing='ij')
  positions = np.stack([rows.ravel(), cols.ravel()], -1).astype(np.float32)
  pixels = rng.random((batch, P, 3 * PS * PS)).astype(np.float32)
  return np.concatenate([np.broadcast_to(positions, (batch, P, 2)), pixels], -1)


def scattered_mask(rng):
  """Padded patches anywhere (not only at the end), >= 1 valid per row, one row all valid."""
  mask = rng.random((B, P)) < 0.5
  mask[:, 1] = True
  mask[0] = True
  mask[1, 0] = False
  return mask


def alter_padded(rng, features, mask):
  """Other pixels and positions in the padded patches, then those patches shuffled per row."""
  out = features.copy()
  out[~mask] = rng.random(out[~mask].shape) * 3
  for b in range(len(out)):
    padded = np.flatnonzero(~mask[b])
    out[b, padded] = out[b, rng.permutation(padded)]
  return out


# -------------------------------------------------------------------------------- PatchEncoder

@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, features, lengths):
  return nnx.merge(graphdef, state)(features, lengths)


def abstract_apply(module, *args):
  """Output shapes of module(*args) for an nnx.eval_shape'd module (nothing allocated)."""
  graphdef, state = nnx.split(module)
  return jax.eval_shape(lambda state, *a: nnx.merge(graphdef, state)(*a), state, *args)


def make_encoder(kind='dense', num_layers=2, dtype=jnp.float32):
  return PatchEncoder(**ENC, num_layers=num_layers, dtype=dtype,
                      attention=AttentionSpec.of(kind, window_size=4), rngs=nnx.Rngs(0))


@pytest.mark.parametrize('num_layers', [0, 2])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_encoder_shapes_dtypes_params_float32(num_layers, dtype):
  encoder = nnx.eval_shape(lambda: make_encoder(num_layers=num_layers, dtype=dtype))
  out = abstract_apply(encoder, jax.ShapeDtypeStruct((B, P, F), jnp.float32),
                       jax.ShapeDtypeStruct((B,), jnp.int32))
  chex.assert_shape(out, (B, P, D))
  chex.assert_type(out, dtype)
  params = nnx.state(encoder, nnx.Param)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert len(encoder.layers) == num_layers
  assert encoder.patch_embed.kernel.shape == (3 * PS * PS, D)
  assert encoder.row_embed.embedding.shape == encoder.col_embed.embedding.shape == (P, D)


def test_encoder_attention_kind_is_the_cross_attention_kind():
  kind = lambda k: nnx.eval_shape(lambda: make_encoder(k)).attention.kind
  assert [kind(k) for k in ('dense', 'dot_product', 'fused_cpu', 'window')] == [
      'dense', 'dot_product', 'fused_cpu', 'dense']


def test_encoder_rejects_wrong_feature_width():
  encoder = nnx.eval_shape(make_encoder)
  with pytest.raises(ValueError, match=r'features_BxPxF: 13 features per patch, expected 14'):
    abstract_apply(encoder, jax.ShapeDtypeStruct((B, P, F - 1), jnp.float32))


@pytest.mark.parametrize('num_layers,kind', [(0, 'dense')] + [(2, k) for k in KINDS])
def test_encoder_valid_patches_ignore_padded_ones(num_layers, kind):
  """Patches [0, length) are real: changing the others changes none of the real outputs, and
  the real outputs depend on each other (attention does mix them)."""
  rng = np.random.default_rng(3)
  graphdef, state = nnx.split(materialize(lambda: make_encoder(kind, num_layers), seed=1))
  features = flattened_patches(rng)
  lengths = np.array([P, 3, 1], np.int32)
  padded = np.arange(P)[None, :] >= lengths[:, None]
  other = features.copy()
  other[padded] = rng.random(other[padded].shape) * 5
  out, out_other = (np.asarray(_encode(graphdef, state, jnp.asarray(f), jnp.asarray(lengths)))
                    for f in (features, other))
  chex.assert_tree_all_finite(out)
  np.testing.assert_allclose(out_other[~padded], out[~padded], rtol=1e-5, atol=1e-5)
  assert not np.allclose(out_other[padded], out[padded])
  if num_layers:
    # Patch 0 of row 0 sees patch 1: a change there reaches it.
    nudged = features.copy()
    nudged[0, 1, 2:] += 0.5
    out_nudged = np.asarray(_encode(graphdef, state, jnp.asarray(nudged), jnp.asarray(lengths)))
    assert np.abs(out_nudged[0, 0] - out[0, 0]).max() > 1e-4


def test_encoder_positions_matter_and_out_of_range_ones_are_clipped():
  rng = np.random.default_rng(4)
  graphdef, state = nnx.split(materialize(lambda: make_encoder(num_layers=0), seed=2))
  features = flattened_patches(rng)
  lengths = jnp.full((B,), P, jnp.int32)
  out = np.asarray(_encode(graphdef, state, jnp.asarray(features), lengths))
  moved = features.copy()
  moved[:, :, 0] = ROWS - 1 - moved[:, :, 0]
  assert not np.allclose(np.asarray(_encode(graphdef, state, jnp.asarray(moved), lengths)), out)
  far = features.copy()
  far[:, :, :2] = [[P - 1, P - 1]]
  beyond = features.copy()
  beyond[:, :, :2] = [[P + 7, 10 * P]]
  np.testing.assert_array_equal(
      np.asarray(_encode(graphdef, state, jnp.asarray(beyond), lengths)),
      np.asarray(_encode(graphdef, state, jnp.asarray(far), lengths)))


# --------------------------------------------------------------------- the pixel Phase1Decoder

@pytest.fixture(scope='module')
def pixel_model():
  # A seed whose greedy pages differ from row to row and repeat no single token.
  return materialize(lambda: make_tiny(**PIXEL), seed=11)


@pytest.fixture(scope='module')
def pixel_batch():
  rng = np.random.default_rng(77)
  features, mask = flattened_patches(rng), scattered_mask(rng)
  inputs = rng.integers(3, TINY['vocab_size'], (B, SEQ)).astype(np.int32)
  inputs[:, 0] = BOS
  inputs[np.arange(SEQ)[None] >= np.array([SEQ, 8, 5])[:, None]] = PAD
  return {'features': features, 'feature_mask': mask, 'inputs': inputs}


def test_pixel_model_params_and_feature_dim_check():
  model = nnx.eval_shape(lambda: make_tiny(**PIXEL))
  names = set(nnx.state(model, nnx.Param))
  assert 'patch_encoder' in names and not names & {'feature_proj', 'memory_norm'}
  assert len(model.patch_encoder.layers) == PIXEL['encoder_layers']
  features_model = nnx.eval_shape(make_tiny)
  assert features_model.patch_encoder is None
  assert {'feature_proj', 'memory_norm'} <= set(nnx.state(features_model, nnx.Param))
  with pytest.raises(ValueError, match=r'^feature_dim=15: must be 2 \+ 3 \* patch_size\*\*2 = 14'):
    nnx.eval_shape(lambda: make_tiny(**{**PIXEL, 'feature_dim': F + 1}))


def test_pixel_model_ignores_padded_patches_and_their_order(pixel_model, pixel_batch):
  """Outputs are unchanged when the padded patches change and move, and (up to rounding) when
  the patches are permuted as a whole (positions come from the row/column features)."""
  rng = np.random.default_rng(8)
  forward = JittedModel(pixel_model)
  f, mask, inputs = pixel_batch['features'], pixel_batch['feature_mask'], pixel_batch['inputs']
  out = forward(jnp.asarray(f), jnp.asarray(mask), jnp.asarray(inputs))
  chex.assert_tree_all_finite(out)
  other = forward(jnp.asarray(alter_padded(rng, f, mask)), jnp.asarray(mask), jnp.asarray(inputs))
  chex.assert_trees_all_close(other, out, rtol=1e-6, atol=1e-6)
  order = rng.permutation(P)
  permuted = forward(jnp.asarray(f[:, order]), jnp.asarray(mask[:, order]), jnp.asarray(inputs))
  chex.assert_trees_all_close(permuted, out, rtol=1e-4, atol=1e-4)
  # The mask matters: all patches valid gives other outputs.
  everything = forward(jnp.asarray(f), jnp.ones_like(jnp.asarray(mask)), jnp.asarray(inputs))
  assert not np.allclose(everything['detail_logits'], out['detail_logits'], atol=1e-3)


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(graphdef, state, features, mask, inputs, key):
  def loss(state):
    out = nnx.merge(graphdef, state)(features, mask, inputs, dropout_key=key)
    return sum(jnp.mean(jnp.square(v)) for v in out.values())
  return jax.value_and_grad(loss)(state)


def test_pixel_model_forward_and_gradients_finite(pixel_model, pixel_batch):
  graphdef, state = nnx.split(pixel_model)
  args = (jnp.asarray(pixel_batch[k]) for k in ('features', 'feature_mask', 'inputs'))
  loss, grads = _loss_and_grads(graphdef, state, *args, jax.random.key(0))
  chex.assert_tree_all_finite((loss, grads))
  encoder = grads['patch_encoder']
  for g in (encoder['patch_embed']['kernel'], encoder['layers'][0]['attn']['qkv']['kernel'],
            encoder['row_embed']['embedding']):
    assert np.abs(np.asarray(g[...])).max() > 0


@functools.partial(jax.jit, static_argnames='max_len')
def _decode_steps(model, features, feature_mask, tokens, *, max_len):
  """decode_step at positions 0..T-1 (init_decode_state given the mask): logits per position."""
  state = model.init_decode_state(features, max_len, feature_mask)

  def body(state, xs):
    detail, _, state = model.decode_step(xs[1], xs[0], state, feature_mask)
    return state, detail

  _, detail = jax.lax.scan(body, state, (jnp.arange(tokens.shape[1]), tokens.T))
  return jnp.swapaxes(detail, 0, 1)


def test_pixel_decode_step_equals_call_on_each_prefix(pixel_model, pixel_batch):
  rng = np.random.default_rng(9)
  f, mask = jnp.asarray(pixel_batch['features']), jnp.asarray(pixel_batch['feature_mask'])
  tokens = rng.integers(3, TINY['vocab_size'], (B, SEQ)).astype(np.int32)
  tokens[:, 0] = BOS
  detail = _decode_steps(pixel_model, f, mask, jnp.asarray(tokens), max_len=SEQ)
  forward = JittedModel(pixel_model)
  for p in range(SEQ):
    prefix = jnp.asarray(np.where(np.arange(SEQ) <= p, tokens, PAD).astype(np.int32))
    np.testing.assert_allclose(detail[:, p], forward(f, mask, prefix)['detail_logits'][:, p],
                               atol=1e-4, rtol=1e-4)
  # Without the mask the encoder attends the padded patches too: other logits.
  unmasked = _decode_steps(pixel_model, f, jnp.ones_like(mask), jnp.asarray(tokens), max_len=SEQ)
  assert not np.allclose(unmasked, detail, atol=1e-3)


def test_pixel_cached_greedy_decoding_equals_reference(pixel_model, pixel_batch):
  args = (jnp.asarray(pixel_batch['features']), jnp.asarray(pixel_batch['feature_mask']))
  cached = np.asarray(cached_decode(pixel_model, *args, max_len=SEQ, bos_id=BOS, eos_id=NEVER,
                                    pad_id=PAD))
  np.testing.assert_array_equal(cached, reference_decode(pixel_model, *args, eos_id=NEVER))
  assert len({tuple(r) for r in cached}) == B and len(np.unique(cached)) > 2
  # Padded patches changed and moved: the same pages.
  other = alter_padded(np.random.default_rng(10), pixel_batch['features'],
                       pixel_batch['feature_mask'])
  np.testing.assert_array_equal(np.asarray(cached_decode(
      pixel_model, jnp.asarray(other), args[1], max_len=SEQ, bos_id=BOS, eos_id=NEVER,
      pad_id=PAD)), cached)


@functools.partial(jax.jit, static_argnames=('settings', 'use_cache'))
def _decode(model, features, feature_mask, *, settings, use_cache):
  return decoding.decode_tokens(model, features, feature_mask, settings=settings,
                                ids=decoding.TokenIds(BOS, NEVER, PAD), use_cache=use_cache)


def test_pixel_beam_search_cached_equals_recomputed(pixel_model, pixel_batch):
  """Beams repeat each page's rows: the cached decoder's memory mask must follow them."""
  args = (pixel_model, jnp.asarray(pixel_batch['features']),
          jnp.asarray(pixel_batch['feature_mask']))
  beam = decoding.DecodeSettings(max_len=SEQ, strategy='beam', beam_size=3)
  cached, recomputed = (_decode(*args, settings=beam, use_cache=c) for c in (True, False))
  np.testing.assert_array_equal(cached[0], recomputed[0])
  np.testing.assert_allclose(cached[1], recomputed[1], rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------------- records

def pixel_record(rng, n_patches, n_tokens=9, ps=PS):
  rows, cols = np.divmod(np.arange(n_patches), 3)
  return {'patches': rng.integers(0, 256, (n_patches, 3 * ps * ps)).astype(np.uint8),
          'patch_positions': np.stack([rows, cols], -1).astype(np.int16),
          'tokens': rng.integers(4, 300, n_tokens).astype(np.int32),
          'semantic_labels': rng.integers(-1, 5, n_tokens).astype(np.int8),
          'element_labels': (rng.random(4) < 0.5).astype(np.uint8),
          'source_id': 'shot.html'}


@pytest.mark.parametrize('n_patches', [0, 5, 8, 13])
def test_to_example_of_a_pixel_record(n_patches):
  rec = pixel_record(np.random.default_rng(n_patches), n_patches)
  ex = records.to_example(rec, max_seq_len=16, num_patches=P)
  assert ex['features'].shape == (P, F) and ex['features'].dtype == np.float32
  n = min(n_patches, P)
  np.testing.assert_array_equal(ex['feature_mask'], np.arange(P) < n)
  np.testing.assert_array_equal(ex['features'][:n, :2], rec['patch_positions'][:n])
  np.testing.assert_array_equal(ex['features'][:n, 2:],
                                rec['patches'][:n].astype(np.float32) / np.float32(255))
  assert not ex['features'][n:].any()
  assert np.all((ex['features'][:, 2:] >= 0) & (ex['features'][:, 2:] <= 1))
  # The labels are built exactly as for a features record.
  features_rec = {**{k: v for k, v in rec.items() if k not in ('patches', 'patch_positions')},
                  'features': np.zeros((n_patches, 3), np.float16)}
  same = records.to_example(features_rec, max_seq_len=16, num_patches=P)
  for k in ('inputs', 'targets', 'target_mask', 'semantic_labels', 'semantic_mask',
            'element_labels', 'feature_mask'):
    np.testing.assert_array_equal(ex[k], same[k])


def test_pixel_record_round_trip_and_bad_records():
  rec = pixel_record(np.random.default_rng(0), 6)
  got = records.decode_record(records.encode_record(rec))
  assert set(got) == set(records.PIXEL_ARRAY_FIELDS) | {'source_id'}
  assert records.record_kind(got) == 'pixels'
  for k in records.PIXEL_ARRAY_FIELDS:
    np.testing.assert_array_equal(got[k], rec[k])
    assert got[k].dtype == records.PIXEL_ARRAY_FIELDS[k]
  assert list(records.ARRAY_FIELDS) == ['features', 'tokens', 'semantic_labels', 'element_labels']
  with pytest.raises(KeyError, match='patch_positions'):
    records.encode_record({k: v for k, v in rec.items() if k != 'patch_positions'})


def write_dataset(directory, meta_extra, pages=()):
  writers = {s: records.ShardWriter(str(directory), s) for s in ('train', 'val')}
  for page in pages:
    for w in writers.values():
      w.write(page)
  for w in writers.values():
    w.close()
  meta = {'format': records.FORMAT, 'version': records.VERSION, 'feature_dim': F,
          'vocab_size': 1000, 'semantic_classes': ['a'] * TINY['num_semantic_classes'],
          'element_types': ['t'] * TINY['num_element_types'],
          'splits': {s: {'num_records': max(w.count, 100), 'shards': w.shards}
                     for s, w in writers.items()}, **meta_extra}
  records.write_metadata(str(directory), meta)
  return meta


def test_pixel_dataset_reads_through_the_pipeline(tmp_path):
  rng = np.random.default_rng(1)
  pages = [pixel_record(rng, n) for n in (3, 11)]
  write_dataset(tmp_path, {'input': 'pixels', 'patch_size': PS, 'max_patches': P}, pages)
  config = base_config()
  config.data.update(name='files', path=str(tmp_path), patch_size=PS, max_patches=P,
                     feature_dim=F, max_seq_len=16)
  assert specs.data_spec(config).num_patches == P
  source = pipeline.make_source(specs.data_spec(config), 'train')
  for i, page in enumerate(pages):
    ex = source[i]
    assert ex['features'].shape == (P, F)
    np.testing.assert_array_equal(ex['feature_mask'], np.arange(P) < min(len(page['patches']), P))
  config.data.update(patch_size=0, max_patches=0)
  assert specs.data_spec(config).num_patches == config.data.grid_rows * config.data.grid_cols


def test_metadata_versions_and_input_kinds(tmp_path):
  write_dataset(tmp_path, {'version': 1})
  meta = records.read_metadata(str(tmp_path))
  assert meta['version'] == 1 and records.input_kind(meta) == 'features'
  for extra, words in (({'version': 3}, 'version 3'), ({'input': 'video'}, "input 'video'"),
                       ({'input': 'pixels', 'max_patches': 8}, 'patch_size None')):
    write_dataset(tmp_path, extra)
    with pytest.raises(records.DatasetError, match=words) as info:
      records.read_metadata(str(tmp_path))
    assert '\n' not in str(info.value)


# ---------------------------------------------------------------------------------------- config

def assert_config_error(config, field):
  with pytest.raises(ConfigError) as info:
    validate(config)
  message = str(info.value)
  assert message.startswith(f'config.{field}='), message
  assert '\n' not in message


def pixel_config(path, **data):
  config = base_config()
  config.data.update(name='files', path=str(path), patch_size=PS, max_patches=P, feature_dim=F)
  config.data.update(data)
  config.model.update(num_semantic_classes=TINY['num_semantic_classes'],
                      num_element_types=TINY['num_element_types'], encoder_layers=1)
  return config


@pytest.mark.parametrize('overrides,field', [
    ({'data.patch_size': 2}, 'data.patch_size'),                      # synthetic pages
    ({'data.max_patches': 8}, 'data.max_patches'),                    # without patch_size
    ({'model.encoder_layers': 2}, 'model.encoder_layers'),            # without patch_size
    ({'data.patch_size': -1}, 'data.patch_size'),
    ({'model.encoder_layers': -1}, 'model.encoder_layers'),
])
def test_new_fields_on_a_features_config(overrides, field):
  config = base_config()
  for path, value in overrides.items():
    section, name = path.split('.')
    config[section][name] = value
  assert_config_error(config, field)


@pytest.fixture
def pixel_dir(tmp_path):
  write_dataset(tmp_path, {'input': 'pixels', 'patch_size': PS, 'max_patches': P})
  return tmp_path


def test_pixel_config_fields_against_the_dataset(pixel_dir, tmp_path_factory):
  validate(pixel_config(pixel_dir))
  validate(pixel_config(pixel_dir, max_patches=3))   # pages cut to fewer patches: allowed
  assert_config_error(pixel_config(pixel_dir, max_patches=0), 'data.max_patches')
  assert_config_error(pixel_config(pixel_dir, feature_dim=F + 1), 'data.feature_dim')
  assert_config_error(pixel_config(pixel_dir, patch_size=4, feature_dim=2 + 48),
                      'data.patch_size')
  features_dir = tmp_path_factory.mktemp('features')
  write_dataset(features_dir, {})
  assert_config_error(pixel_config(features_dir), 'data.patch_size')
  config = pixel_config(pixel_dir, patch_size=0, max_patches=0)
  config.model.encoder_layers = 0
  assert_config_error(config, 'data.patch_size')   # a features config on a pixel dataset


def test_new_fields_are_architecture_fields():
  for field in ('data.patch_size', 'data.max_patches', 'model.encoder_layers'):
    assert field in config_lib.ARCHITECTURE_FIELDS
  assert config_lib.architecture(base_config())['model.encoder_layers'] == 0


@pytest.mark.parametrize('name,d_model,encoder_layers', [('pixels_small', 256, 2),
                                                          ('pixels', 768, 4)])
def test_pixel_configs_read_the_dataset_and_build(tmp_path, name, d_model, encoder_layers):
  meta = write_dataset(tmp_path, {'input': 'pixels', 'patch_size': 16, 'max_patches': 96,
                                  'feature_dim': patch_feature_dim(16), 'vocab_size': 1000,
                                  'semantic_classes': ['a'] * 7, 'element_types': ['t'] * 9})
  (tmp_path / 'tokenizer.json').write_text('{}')   # prepare writes one: evaluation renders with it
  config = config_lib.load_file(REPO / 'configs' / f'{name}.py', str(tmp_path))
  validate(config)
  assert (config.data.patch_size, config.data.max_patches, config.data.feature_dim) == (
      16, 96, meta['feature_dim'])
  assert config.model.vocab_size == 1024 and config.model.num_semantic_classes == 7
  assert config.model.num_element_types == 9
  assert (config.model.d_model, config.model.encoder_layers) == (d_model, encoder_layers)
  if name == 'pixels_small':
    model = nnx.eval_shape(lambda: Phase1Decoder(specs.model_spec(config), rngs=nnx.Rngs(0)))
    assert len(model.patch_encoder.layers) == encoder_layers
    assert model.patch_encoder.row_embed.embedding.shape == (96, d_model)
  # Without a directory the defaults stand (and validate() names data.path).
  bare = config_lib.load_file(REPO / 'configs' / f'{name}.py')
  assert bare.data.patch_size == 16 and bare.data.feature_dim == patch_feature_dim(16)
  assert_config_error(bare, 'data.path')


def test_standardize_centres_each_page_over_its_real_patches():
  rng = np.random.default_rng()
  pixels = rng.random((3, 7, 12)).astype(np.float32)
  lengths = np.array([7, 4, 1])
  out = np.asarray(standardize(jnp.asarray(pixels), jnp.asarray(lengths)))
  for b, n in enumerate(lengths):
    real = pixels[b, :n]
    want = (real - real.mean()) / max(real.std(), 1 / np.sqrt(real.size))
    np.testing.assert_allclose(out[b, :n], want, rtol=1e-5, atol=1e-5)
    assert (out[b, n:] == 0).all()
  # A blank (constant) page stays finite: zeros.
  blank = standardize(jnp.ones((1, 5, 12)), jnp.array([5]))
  np.testing.assert_array_equal(np.asarray(blank), 0)
