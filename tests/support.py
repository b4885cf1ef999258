"""What the tests share besides fixtures (tests/conftest.py holds those): the tiny model's
sizes, random-parameter modules without init compiles, and a jitted forward."""
from __future__ import annotations

import functools
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]

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


def tiny_spec(**overrides):
  """TINY as a ModelSpec; `dtype` may be given as a jnp dtype."""
  from phase1_jax.model.spec import ModelSpec
  if 'dtype' in overrides:
    overrides['dtype'] = jnp.dtype(overrides['dtype']).name
  return ModelSpec(**{**TINY, **overrides})


def make_tiny(**overrides):
  from phase1_jax.model.phase1 import Phase1Decoder
  return Phase1Decoder(tiny_spec(**overrides), rngs=nnx.Rngs(0))


def skip_module_without_browser() -> None:
  """Skips the calling test module (at import) when Playwright or a Chromium is missing: the
  rendering tests are optional where the render extra is not installed."""
  import pytest
  pytest.importorskip('playwright.sync_api', reason='playwright not installed (optional: render)')
  from phase1_jax.data import render
  try:
    render.check_available(render.RenderSpec())
  except render.RenderUnavailable as e:
    pytest.skip(f'no browser to render with: {e}', allow_module_level=True)
