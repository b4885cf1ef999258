"""specs.py, the boundary: the config read once into frozen specs, every `auto` resolved, and
nothing below it reading the config tree."""
from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import pytest
from support import REPO

from phase1_jax import config as config_lib
from phase1_jax import specs
from phase1_jax.config import ConfigError
from phase1_jax.model.attention import AttentionSpec, attend
from phase1_jax.model.spec import ModelSpec

# The CLIs and the config side may read the tree; every other module takes specs.
CONFIG_SIDE = {'config.py', 'config_dataset.py', 'config_validation.py', 'config_checks.py',
               'specs.py', 'train.py', 'evaluate.py', 'generate.py', 'baselines.py'}


def tiny():
  return config_lib.load_file(REPO / 'configs' / 'tiny.py')


def test_no_module_below_the_boundary_reads_the_config_tree():
  readers = sorted(
      str(path.relative_to(REPO)) for path in (REPO / 'phase1_jax').rglob('*.py')
      if not (path.parent.name == 'phase1_jax' and path.name in CONFIG_SIDE)
      and re.search(r'ml_collections|ConfigDict', path.read_text()))
  assert readers == []


def test_run_spec_reads_every_section_and_resolves_the_autos():
  config = tiny()
  config.model.compute_dtype = 'auto'
  config.model.attention.kind = 'auto'
  config.model.scan_layers = None
  run = specs.run_spec(config)
  m = run.model
  assert (m.d_model, m.num_layers, m.vocab_size, m.max_seq_len) == (
      config.model.d_model, config.model.num_layers, config.model.vocab_size,
      config.data.max_seq_len)
  assert m.dtype == ('float32' if jax.default_backend() == 'cpu' else 'bfloat16')
  assert m.attention.kind == specs.attention_kind('auto') != 'auto'
  assert m.scan_layers is (config.model.num_layers > specs.MAX_AUTO_UNROLLED_LAYERS)
  assert run.optimizer.learning_rate == config.train.learning_rate
  assert run.mesh.batch_size == config.train.batch_size
  assert run.eval.targets['bleu'] == config.eval.bleu_target
  assert run.checkpoint.best_mode == config_lib.METRIC_MODES[config.checkpoint.best_metric]
  assert run.data.page.max_seq_len == config.data.max_seq_len
  assert run.config == config.to_dict()
  assert run.architecture == config_lib.architecture(config)
  with pytest.raises(dataclasses.FrozenInstanceError):
    run.model.d_model = 8   # frozen: nothing below changes what the config said


def test_run_spec_names_a_bad_field_in_one_line():
  config = tiny()
  config.model.num_heads = 5   # d_model 32 is not divisible by it
  with pytest.raises(ConfigError, match=r'model\.num_heads') as info:
    specs.run_spec(config)
  assert '\n' not in str(info.value)


def test_attention_spec_is_checked_once_when_built():
  assert AttentionSpec.of('dense', window_size=8, top_k=2, block_size=4) == AttentionSpec()
  assert AttentionSpec.of('window_topk', window_size=8, top_k=2).top_k == 2
  with pytest.raises(ValueError, match='window_size: required'):
    AttentionSpec('window')
  with pytest.raises(ValueError, match='top_k=3: not used'):
    AttentionSpec('window', window_size=4, top_k=3)
  with pytest.raises(ValueError, match='dtype='):
    ModelSpec(vocab_size=8, num_semantic_classes=2, num_element_types=2, feature_dim=4,
              max_seq_len=8, d_model=8, num_heads=2, num_layers=1, num_unique_layers=1,
              mlp_dim=8, dtype='auto')


@pytest.mark.parametrize('spec', [AttentionSpec(), AttentionSpec('window', window_size=5,
                                                                 block_size=4)])
def test_attention_spec_call_is_attend(spec):
  rng = np.random.default_rng()
  q, k, v = (rng.standard_normal((2, 12, 2, 8)).astype(np.float32) for _ in range(3))
  lengths = np.array([12, 7], np.int32)
  got = spec(q, k, v, kv_lengths_B=lengths, causal=True)
  want = attend(q, k, v, kv_lengths_B=lengths, causal=True, kind=spec.kind, **spec.options())
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
