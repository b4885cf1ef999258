"""Shared test setup: persistent XLA compilation cache, full-precision matmuls, and the session
fixtures (the tiny model and its jitted forward, a finished tiny run, a prepared features dataset,
a rendered dataset);
tests/support.py holds the helpers they are built from.

XLA compiles dominate the test time on CPU, so every test that runs the full Phase1Decoder goes
through the session fixtures here (one graphdef, one jitted forward per input shape).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import (
  BATCH,
  PATCHES,
  REPO,
  SEQ,
  TINY,
  JittedModel,
  make_tiny,
  materialize,
  write_corpus,
)

# .jax_cache/ is git-ignored. Cache every compile, however small or fast.
jax.config.update('jax_compilation_cache_dir', str(REPO / '.jax_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
# The equivalence tests compare float32 paths (scan/unrolled, sparse/dense, cached/uncached,
# chunked/full) at tolerances of 1e-4 and below. A GPU's float32 matmuls default to TF32, whose
# rounding differs from path to path by about 1e-3: on an H100, 41 of them failed for that alone.
# So tests run float32 matmuls in full precision on every backend (CPU's default already is).
jax.config.update('jax_default_matmul_precision', 'highest')
# Implicit rank promotion ([B,T] op [T]) hides shape bugs: broadcasting must be explicit.
jax.config.update('jax_numpy_rank_promotion', 'raise')


@pytest.fixture(scope='session')
def tiny_model():
  return materialize(make_tiny, seed=0)


@pytest.fixture(scope='session')
def tiny_forward(tiny_model):
  return JittedModel(tiny_model)


@pytest.fixture(scope='session')
def tiny_batch():
  """Random features (B x P x F), a feature mask with masked patches (>= 1 valid per row), and
  BOS + random non-pad tokens followed by padding, different lengths per row."""
  rng = np.random.default_rng(1234)
  features = rng.standard_normal((BATCH, PATCHES, TINY['feature_dim'])).astype(np.float32)
  feature_mask = rng.random((BATCH, PATCHES)) < 0.6
  feature_mask[:, 0] = True
  feature_mask[1, 2:] = False          # one row with only two valid patches
  feature_mask[2, 1] = False
  inputs = rng.integers(3, TINY['vocab_size'], (BATCH, SEQ)).astype(np.int32)
  inputs[:, 0] = 1
  lengths = np.array([SEQ, 7, 4])
  inputs[np.arange(SEQ)[None] >= lengths[:, None]] = 0
  return {'features': jnp.asarray(features), 'feature_mask': jnp.asarray(feature_mask),
          'inputs': jnp.asarray(inputs), 'lengths': lengths}


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory) -> str:
  """The workdir of a finished run: one epoch of configs/tiny.py (checkpoint, history, config.json,
  evaluation). Shared by the session's tests, which only read it: copy it to change anything."""
  from phase1_jax import config as config_lib
  from phase1_jax.training import loop
  path = str(tmp_path_factory.mktemp('tiny_run'))
  config = config_lib.load_file(REPO / 'configs' / 'tiny.py')
  config.train.num_epochs = 1
  loop.train_and_evaluate(config, path)
  return path


@pytest.fixture(scope='session')
def rendered_pixel_dataset(tmp_path_factory) -> str:
  """A tiny prepared pixel dataset (10 synthetic pages rendered 480 px wide by Chromium, 8 px
  patches, 96 per page, about a third val), shared by the rendering tests, which only read it
  (the baselines CLI adds its baselines.json). Tests that use it skip without a browser."""
  from phase1_jax.data import prepare, render, synthetic_html
  spec = render.RenderSpec(width=480, max_height=900, timeout_s=20)
  root = str(tmp_path_factory.mktemp('pages'))
  synthetic_html.write_pages(root, 10, seed=3, width=480)
  out = str(tmp_path_factory.mktemp('prepared') / 'pixels')
  prepare.prepare(root, out, vocab_size=400, val_fraction=0.3, render_spec=spec, patch_size=8,
                  max_patches=96, workers=2, progress=False)
  return out


@pytest.fixture(scope='session')
def prepared(tmp_path_factory):
  """A prepared features dataset of support.write_corpus's pages (4 records per shard, a fifth
  val): (html folder, dataset, dataset.json, {relative path: html}, features folder). Shared by
  the session's tests, which only read it: copy it to change anything."""
  from phase1_jax.data import prepare
  root, feats = tmp_path_factory.mktemp('html'), tmp_path_factory.mktemp('features')
  pages = write_corpus(str(root), features=str(feats))
  out = str(tmp_path_factory.mktemp('prepared') / 'data')
  meta = prepare.prepare(str(root), out, vocab_size=320, val_fraction=0.2, workers=1,
                         features_dir=str(feats), records_per_shard=4, progress=False)
  return str(root), out, meta, pages, str(feats)
