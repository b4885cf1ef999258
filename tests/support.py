"""What the tests share besides fixtures (tests/conftest.py holds those): the tiny model's
sizes, random-parameter modules without init compiles, a jitted forward, abstract shape checks,
the example keys and dtypes, the tiny training setup, and a small HTML corpus with features."""
from __future__ import annotations

import functools
import os
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


# ------------------------------------------------------------------ abstract shapes and dtypes

def sds(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def abstract_call(make, *args, method='__call__', **kwargs):
  """(params state, output shapes) of make().method(*args), without allocating or compiling."""
  graphdef, state = nnx.split(nnx.eval_shape(make))

  def call(state, *args):
    return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs)

  return nnx.state(nnx.merge(graphdef, state), nnx.Param), jax.eval_shape(call, state, *args)


def assert_params_float32(state):
  leaves = jax.tree.leaves(state)
  assert leaves
  for leaf in leaves:
    assert leaf.dtype == jnp.float32, leaf


# ---------------------------------------------------------------------- a page example's fields

KEYS = ('features', 'feature_mask', 'inputs', 'targets', 'target_mask', 'semantic_labels',
        'semantic_mask', 'element_labels')
DTYPES = {'features': np.float32, 'feature_mask': np.bool_, 'inputs': np.int32,
          'targets': np.int32, 'target_mask': np.bool_, 'semantic_labels': np.int32,
          'semantic_mask': np.bool_, 'element_labels': np.float32}


# ------------------------------------------------------------------ training on the tiny config

def load_config(name):
  from phase1_jax import config as config_lib
  return config_lib.load_file(os.path.join(REPO, 'configs', f'{name}.py'))


def tiny_setup(config, steps_per_epoch):
  """(tx, graphdef, fresh state, jitted train step, first training batches) for `config`."""
  from phase1_jax import specs
  from phase1_jax.data import pipeline
  from phase1_jax.training import parallel
  from phase1_jax.training import state as state_lib
  tx, _ = state_lib.make_optimizer(specs.optimizer_spec(config), steps_per_epoch=steps_per_epoch)
  graphdef, state = state_lib.create_train_state(specs.model_spec(config), tx, seed=config.seed)
  step = parallel.jit_train_step(graphdef=graphdef, tx=tx,
                                 loss_spec=specs.loss_spec(config))
  source = pipeline.make_source(specs.data_spec(config), 'train')
  batches = list(pipeline.train_iterator(source, batch_size=8, seed=0, epoch=0))[:4]
  return tx, graphdef, state, step, batches


# --------------------------------------------------------- an HTML corpus with features per page

FEATURE_DIM, MAX_PATCHES = 16, 16     # configs/tiny.py's feature width and 4 x 4 patches

SECTIONS = ['<header><nav><a href="/">Home</a><a href="/a">About</a><a>Blog</a></nav></header>',
            '<section class="pricing"><h2>Plans</h2><table><tr><td>Pro</td></tr></table>'
            '<button>Buy now</button></section>',
            '<div class="carousel"><img alt="photo"><img src="x.png"></div>',
            '<form><input type="email" placeholder="Email"><button>Subscribe</button></form>',
            '<section class="faq"><details><summary>Why?</summary>Because.</details></section>',
            '<aside><ul><li><a>One</a></li><li><a>Two</a></li></ul></aside>',
            '<form><input name="u"><input type="password"><input type="checkbox"></form>',
            '<main><p>Welcome to our   page,\n\n here is  <b>news</b>.</p></main>',
            '<footer><p>(c) 2024 <i class="fa fa-heart"></i></p></footer>']


def write_corpus(root, n_pages=14, seed=0, features=None):
  """n_pages pages of random section mixes (nested folders), plus one broken, one empty and one
  non-HTML page. Returns {relative path: html}. With `features` (a folder), each page also gets
  random features [2..MAX_PATCHES, FEATURE_DIM] there."""
  rng = np.random.default_rng(seed)
  pages = {}
  for i in range(n_pages):
    picks = rng.choice(len(SECTIONS), rng.integers(2, 6), replace=False)
    body = ''.join(SECTIONS[k] for k in picks) + f'<p>page {i} {rng.integers(1000)}</p>'
    pages[f'{"sub/" if i % 3 else ""}page{i}.html'] = (
        f'<!doctype html><html><head><title>t</title><style>p {{}}</style>'
        f'<script>var x = "<a>";</script></head><body>{body}</body></html>')
  pages['sub/deep/broken.htm'] = '<div><p>broken <b>markup <ul><li>one<li>two</table></td><<p>>'
  pages['sub/empty.html'] = ''
  for rel, html in pages.items():
    os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
    with open(os.path.join(root, rel), 'w') as f:
      f.write(html)
  with open(os.path.join(root, 'notes.txt'), 'w') as f:
    f.write('not a page')
  if features is not None:
    write_features(features, pages, rng)
  return pages


def write_features(folder, pages, rng):
  """Random user features per page, {relative path: array}."""
  arrays = {}
  for rel in pages:
    arrays[rel] = rng.standard_normal((int(rng.integers(2, MAX_PATCHES + 1)), FEATURE_DIM))
    path = os.path.join(folder, os.path.splitext(rel)[0] + '.npy')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, arrays[rel].astype(np.float32))
  return arrays


def files_config(out):
  from phase1_jax import config as config_lib
  from phase1_jax.data import records
  config = config_lib.load_file(os.path.join(REPO, 'configs', 'tiny.py'))
  config.data.name, config.data.path = 'files', out
  meta = records.read_metadata(out)
  config.model.num_semantic_classes = len(meta['semantic_classes'])
  config.model.num_element_types = len(meta['element_types'])
  return config
