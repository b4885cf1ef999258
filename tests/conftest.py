"""Shared test setup: persistent XLA compilation cache, random-parameter modules without init
compiles, and one tiny Phase1Decoder with a jitted forward.

XLA compiles dominate the test time on CPU, so every test that runs the full Phase1Decoder goes
through the session fixtures here (one graphdef, one jitted forward per input shape).
"""
from __future__ import annotations

import functools
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

REPO = Path(__file__).resolve().parents[1]

# .jax_cache/ is git-ignored. Cache every compile, however small or fast.
jax.config.update('jax_compilation_cache_dir', str(REPO / '.jax_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
# The equivalence tests compare float32 paths (scan/unrolled, sparse/dense, cached/uncached,
# chunked/full) at tolerances of 1e-4 and below. A GPU's float32 matmuls default to TF32, whose
# rounding differs from path to path by about 1e-3: on an H100, 41 of them failed for that alone.
# So tests run float32 matmuls in full precision on every backend (CPU's default already is).
jax.config.update('jax_default_matmul_precision', 'highest')

# The tiny model every full-model test uses: 3 layer applications over 2 unique blocks (sharing),
# dropout > 0 so the same model also serves the dropout tests (deterministic without a key).
TINY = dict(vocab_size=64, num_semantic_classes=5, num_element_types=4, feature_dim=8,
            max_seq_len=16, d_model=32, num_heads=4, num_layers=3, num_unique_layers=2,
            mlp_dim=64, dropout_rate=0.2)
BATCH, PATCHES, SEQ = 3, 6, 12


def _param_name(path) -> str:
  names = [getattr(k, 'key', None) for k in path]
  return next(n for n in reversed(names) if isinstance(n, str))


def materialize(make, seed: int):
  """Builds the module `make()` returns with random parameters drawn in numpy (no initializer
  compiles): kernels N(0, 1/fan_in), embeddings N(0, 0.2^2), other matrices N(0, 1/last dim),
  and - unlike a fresh init - nonzero biases and norm offsets (N(0, 0.1^2)) and norm scales
  1 + N(0, 0.1^2), so bugs that drop or mix them up can show."""
  graphdef, state = nnx.split(nnx.eval_shape(make))

  def fill(path, x):
    # Seeded by the parameter's path: a change to one module's parameters leaves the others'.
    rng = np.random.default_rng([seed, zlib.crc32(jax.tree_util.keystr(path).encode())])
    name, z = _param_name(path), rng.standard_normal(x.shape).astype(np.float32)
    if name == 'kernel':
      z = z / np.sqrt(x.shape[-2])
    elif name == 'scale':
      z = 1.0 + 0.1 * z
    elif name == 'embedding':
      z = 0.2 * z    # small enough that a tied head does not just echo the input token
    elif name.startswith('bias') or len(x.shape) < 2:
      z = 0.1 * z
    else:
      z = z / np.sqrt(x.shape[-1])
    return jnp.asarray(z.astype(x.dtype))

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, features, feature_mask, inputs, dropout_key=None):
  model = nnx.merge(graphdef, state)
  return model(features, feature_mask, inputs, dropout_key=dropout_key)


class JittedModel:
  """A Phase1Decoder whose __call__ is jitted (graphdef static, state traced): call-compatible
  with the model, so the package's uncached reference decoder can run on it fast."""

  def __init__(self, model):
    self.model = model
    self.graphdef, self.state = nnx.split(model)

  def __call__(self, features, feature_mask, inputs, dropout_key=None):
    return _forward(self.graphdef, self.state, features, feature_mask, inputs, dropout_key)


def make_tiny(**overrides):
  from phase1_jax.model.phase1 import Phase1Decoder
  return Phase1Decoder(**{**TINY, **overrides}, rngs=nnx.Rngs(0))


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
