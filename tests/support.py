"""What the tests share besides fixtures (tests/conftest.py holds those): the tiny model's
sizes, random-parameter modules without init compiles, a jitted forward, abstract shape checks,
the example keys and dtypes, the tiny training setup, a small HTML corpus with features, and the
attention kernels' comparisons."""
from __future__ import annotations

import functools
import os
import zlib
from pathlib import Path

import chex
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


# --------------------------------------------------------------------------- attention kernels
# The Pallas kernel tests (test_pallas_window*.py): [B, T, N, H] inputs, the same tolerances.
KERNEL_BNH = (2, 2, 8)
# bfloat16: inputs, kernel and reference all in bf16 (one bf16 rounding of p and of the output
# is ~4e-3 relative); the two differ in summation order and in where they round.
KERNEL_TOLERANCE = {jnp.float32: dict(atol=1e-5, rtol=1e-5),
                    jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def kernel_inputs(t, dtype):
  """Fresh q, k, v and a cotangent (the gradient of a random linear functional of the output),
  each [B, t, N, H] of KERNEL_BNH."""
  b, n, h = KERNEL_BNH
  rng = np.random.default_rng()
  return tuple(jnp.asarray(rng.standard_normal((b, t, n, h)), dtype) for _ in range(4))


def assert_kernel_matches(out, grads, want_out, want_grads, dtype, t):
  """Output and gradients of a kernel against its reference: dtypes kept, values within
  KERNEL_TOLERANCE[dtype] (compared in float32)."""
  b, n, h = KERNEL_BNH
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  chex.assert_shape(out, (b, t, n, h))
  f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
  chex.assert_trees_all_close(f32(out), f32(want_out), **KERNEL_TOLERANCE[dtype])
  chex.assert_trees_all_close(f32(grads), f32(want_grads), **KERNEL_TOLERANCE[dtype])


def assert_reads_only(run, inputs, block, num_blocks, keys_read, queries_reading):
  """Poisons (NaN) every block a kernel program should not read; its rows must stay exact. A
  read NaN value block gives 0 * NaN = NaN even where the scores are masked.

  run(q, k, v, cotangent=...) -> (out, (dq, dk, dv)); keys_read(qb) / queries_reading(kb): bool
  [B or 1, N or 1, num_blocks], the key blocks query block qb reads in the forward and dq, the
  query blocks whose dk/dv of key block kb reads."""
  q, k, v, cotangent = inputs
  clean_out, (clean_dq, clean_dk, clean_dv) = run(q, k, v, cotangent=cotangent)

  def poison(x, keep_BxNxblocks):
    keep_BxTxN = np.repeat(keep_BxNxblocks, block, axis=2).transpose(0, 2, 1)
    return jnp.where(jnp.asarray(keep_BxTxN)[..., None], x, jnp.nan)

  for qb in range(num_blocks):
    rows = slice(qb * block, (qb + 1) * block)
    keys = keys_read(qb)
    out, (dq, _, _) = run(q, poison(k, keys), poison(v, keys), cotangent=cotangent)
    chex.assert_trees_all_close((out[:, rows], dq[:, rows]),
                                (clean_out[:, rows], clean_dq[:, rows]), atol=1e-6, rtol=1e-6)
  for kb in range(num_blocks):
    rows = slice(kb * block, (kb + 1) * block)
    queries = queries_reading(kb)
    _, (_, dk, dv) = run(poison(q, queries), k, v, cotangent=poison(cotangent, queries))
    chex.assert_trees_all_close((dk[:, rows], dv[:, rows]),
                                (clean_dk[:, rows], clean_dv[:, rows]), atol=1e-6, rtol=1e-6)


def assert_lowers_for_triton(attend, kernel_names):
  """attend(q, k, v, lengths) with its forward and backward exported for CUDA (lowering only, no
  GPU needed: interpret mode does not run the Triton rules), bfloat16 [2, 100, 2, 24]; every
  name in kernel_names is a Triton call of the module."""
  shape = jax.ShapeDtypeStruct((2, 100, 2, 24), jnp.bfloat16)
  lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
  loss = lambda q, k, v, lengths, c: jnp.sum(attend(q, k, v, lengths).astype(jnp.float32) * c)
  triton = [jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]
  exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=['cuda'],
                               disabled_checks=triton)(shape, shape, shape, lengths, shape)
  text = exported.mlir_module()
  for name in kernel_names:
    assert f'name = "{name}"' in text


def window_topk_no_key_rows(lengths, t, window_size, top_k, block_size):
  """B x T: rows that see no key under a prefix mask. A row sees its local blocks' keys below
  the length; when the local blocks start at or past a length > 0, block 0 holds a key and lies
  before them, so it is selectable whenever any block is (min(top_k, Q - prev - 1) > 0)."""
  num = -(-t // block_size)
  prev = min(-(-(window_size - 1) // block_size), num - 1)
  start_T = jnp.asarray(np.maximum(np.arange(t) // block_size - prev, 0) * block_size)
  can_select = min(top_k, num - prev - 1) > 0
  return (lengths[:, None] == 0) | ((start_T[None, :] >= lengths[:, None]) & (not can_select))


@functools.partial(jax.jit, static_argnames=('window_size', 'top_k', 'block_size'))
def window_topk_expected_vjp(q, k, v, lengths, cotangent, *, window_size, top_k, block_size):
  """The reference on rows that see a key; on the others (which it leaves unspecified)
  dense_attention's value for a fully masked row, the mean of all values."""
  from phase1_jax.model import attention, sparse_attention
  t = q.shape[1]
  mask = attention.prefix_mask(lengths, t)
  empty = window_topk_no_key_rows(lengths, t, window_size, top_k, block_size)[:, :, None, None]

  def attend(q, k, v):
    out = sparse_attention.window_topk_attention(q, k, v, mask, window_size=window_size,
                                                 top_k=top_k, block_size=block_size)
    mean = jnp.mean(v.astype(jnp.float32), axis=1, keepdims=True).astype(v.dtype)
    return jnp.where(empty, mean, out)

  out, vjp = jax.vjp(attend, q, k, v)
  return out, vjp(cotangent)


@functools.partial(jax.jit, static_argnames=('window_size',))
def window_expected_vjp(q, k, v, lengths, cotangent, *, window_size):
  """The `window` kernels' reference: dense_attention with the prefix mask and the band."""
  from phase1_jax.model import attention
  mask = attention.prefix_mask(lengths, q.shape[1])
  attend = lambda q, k, v: attention.dense_attention(q, k, v, mask, causal=True,
                                                     window_size=window_size)
  out, vjp = jax.vjp(attend, q, k, v)
  return out, vjp(cotangent)


def kernel_vjp(attention_fn, q, k, v, lengths, cotangent, **options):
  """(out, (dq, dk, dv)) of attention_fn(q, k, v, lengths, **options, interpret=True): a kernel
  in interpret mode, jitted once per kernel and options."""
  return _kernel_vjp(attention_fn, tuple(sorted(options.items())), q, k, v, lengths, cotangent)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _kernel_vjp(attention_fn, options, q, k, v, lengths, cotangent):
  attend = lambda q, k, v: attention_fn(q, k, v, lengths, **dict(options), interpret=True)
  out, vjp = jax.vjp(attend, q, k, v)
  return out, vjp(cotangent)

