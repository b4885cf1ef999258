"""The config tree: its defaults (the seed's), its allowed values, and helpers to load and read it.

Every config file in `configs/` starts from `base_config()` and overrides fields.
`config_validation.validate(config)` runs before anything compiles and raises `ConfigError` with
one line naming the first bad field.
"""
from __future__ import annotations

import importlib.util
import os
import traceback

import ml_collections
from ml_collections import config_dict

ATTENTION_KINDS = ('dense', 'dot_product', 'window', 'window_topk', 'fused_cpu', 'auto')
COMPUTE_DTYPES = ('auto', 'float32', 'bfloat16')
# The names of model/decoder.py's REMAT_POLICIES (config does not import the model).
REMAT_POLICIES = ('nothing_saveable', 'dots_saveable', 'dots_with_no_batch_dims_saveable')
LOSS_WEIGHTINGS = ('fixed', 'uncertainty')
PATCH_WORD_FORMS = ('softmax', 'sigmoid')   # losses.patch_word_loss
DECODE_STRATEGIES = ('greedy', 'sample', 'beam', 'mbr')
DATA_NAMES = ('synthetic', 'files')
PARALLEL_MODES = ('jit', 'pmap')
DISTRIBUTED = ('off', 'auto', 'manual')
METRIC_MODES = {'val_loss': 'min', 'element_f1': 'max', 'semantic_accuracy': 'max', 'bleu': 'max',
                'targets_score': 'max'}


class ConfigError(ValueError):
  """A config field breaks a rule; the message is one line naming the field."""


def base_config() -> ml_collections.ConfigDict:
  """The seed's defaults (d_model 768, 6 layers, 12 heads, vocab 50000, ...): each section's
  fields, defaults and their meaning are in its function below (_data, _model, ...)."""
  c = ml_collections.ConfigDict()
  c.exp_name = 'phase1_decoder'
  c.seed = 0
  c.data = _data()
  c.model = _model()
  c.loss = _loss()
  c.train = _train()
  c.eval = _eval()
  c.decode = _decode()         # evaluation's BLEU and `generate`
  c.parallel = _parallel()
  c.checkpoint = _checkpoint()
  return c


def _data() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.name = 'synthetic'           # synthetic (generated pages) | files (a prepared directory)
  d.path = ''                   # files: the directory `python -m phase1_jax.data.prepare` wrote
  d.seed = 0                    # the page generator's seed: page i of a split is f(seed, i)
  d.train_samples = 5000
  d.val_samples = 1000
  d.max_seq_len = 256           # decoder length T (targets incl. EOS); longer pages drop sections
  d.grid_rows = 16              # the rendered layout is grid_rows x grid_cols patches
  d.grid_cols = 4
  d.feature_dim = 64            # F; pixel input: 2 + 3 * patch_size**2 (row, column, RGB pixels)
  # 0: the input is fused features (feature_dim per patch). > 0: a screenshot cut into square
  # patches of this many pixels a side (a prepared pixel dataset's; model/encoder.py reads them).
  d.patch_size = 0
  d.max_patches = 0             # pixel input: patches per page, P (pages are cut or padded to it)
  d.feature_noise = 0.5         # std of the Gaussian noise added to every patch feature
  d.text_visibility = 0.8       # probability that a word of an element is rendered into its patches
  d.min_sections = 1
  d.max_sections = 8
  d.max_elements_per_section = 3
  d.max_words_per_element = 2
  return d


def _model() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.vocab_size = 50000
  m.num_semantic_classes = 50
  m.num_element_types = 30
  m.d_model = 768
  m.num_heads = 12
  m.num_layers = 6              # layer applications
  m.num_unique_layers = 3       # distinct blocks; application i uses block i % num_unique_layers
  m.mlp_dim = 3072
  m.encoder_layers = 0          # pixel input: the patch encoder's transformer layers (0: embedding)
  m.dropout_rate = 0.1
  m.compute_dtype = 'auto'      # auto: bfloat16 on GPU/TPU, float32 on CPU (measured faster there)
  m.tie_detail_head = True
  # True: lax.scan over the applications, compile time flat in depth (deep stacks).
  # False: a Python loop, one copy of the layer per application in the program. None (auto):
  # unrolled up to 12 applications, where it measured faster on CPU and GPU (docs/performance.md),
  # scanned beyond. Override: --config.model.scan_layers=True.
  m.scan_layers = config_dict.placeholder(bool)
  m.remat = False
  # With remat: what a layer application keeps for the backward pass (nothing_saveable: only its
  # input; dots_saveable / dots_with_no_batch_dims_saveable: also matmul outputs).
  m.remat_policy = 'nothing_saveable'
  m.attention = ml_collections.ConfigDict()
  # dense | dot_product | window | window_topk | fused_cpu | auto (fused_cpu on a CPU with a C++
  # compiler, else dense; dot_product on GPU/TPU)
  m.attention.kind = 'dense'
  m.attention.window_size = 256   # window kinds: each token sees itself and window_size - 1 before
  m.attention.top_k = 4           # window_topk: earlier key blocks selected per query block
  m.attention.block_size = 0      # window kinds: 0 picks a default from window_size
  return m


def _loss() -> ml_collections.ConfigDict:
  loss = ml_collections.ConfigDict()
  loss.weighting = 'fixed'
  loss.detail_weight = 0.4
  loss.semantic_weight = 0.3
  loss.element_weight = 0.2
  loss.consistency_weight = 0.1
  # > 0 (large vocabularies): training builds the detail logits this many pages at a time, with
  # their gradient in the same pass (detail_loss.fused_head_loss), so no B x T x V float32 logits
  # exist; rounded down to a divisor of the per-device batch. 0: whole logits.
  loss.logits_chunk_pages = 0
  # Pixel input from --render datasets: > 0 adds this times the patch head's loss (each patch's
  # section class and element type: layout) / the patch word head's (its visible BPE tokens).
  loss.patch_weight = 0.0
  loss.patch_words_weight = 0.0
  loss.patch_words_form = 'sigmoid'   # softmax | sigmoid: losses.patch_word_loss
  return loss


def _train() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.batch_size = 16
  t.num_epochs = 50
  t.learning_rate = 1e-4
  t.end_learning_rate_ratio = 0.1   # cosine decays to learning_rate * this
  t.warmup_steps = 500
  t.weight_decay = 0.01
  t.adam_b1 = 0.9
  t.adam_b2 = 0.98
  t.grad_clip_norm = 1.0
  t.accumulate_grad_batches = 1
  t.log_every_steps = 20
  t.histogram_every_epochs = 1
  t.early_stopping_patience = 5     # epochs without improvement of checkpoint.best_metric
  t.stop_when_targets_met = False   # end training at the first epoch whose eval passes every target
  t.max_consecutive_nonfinite = 5   # steps with a non-finite loss/gradient are skipped; this many
                                    # in a row stop training (ERROR, last good checkpoint kept)
  return t


def _eval() -> ml_collections.ConfigDict:
  e = ml_collections.ConfigDict()
  e.batch_size = 64
  e.bleu_samples = 200          # validation pages decoded greedily for BLEU each epoch (0: skip)
  # Rendered evaluation (a prepared dataset; Chromium): the first render_samples of the decoded
  # pages and their references rendered and compared (visual_metrics), in worker processes while
  # the next batch decodes; render_pictures of them go to TensorBoard beside the input screenshot.
  e.render_samples = 0          # <= bleu_samples; 0: off
  e.render_workers = 2          # browser processes
  e.render_pictures = 3         # of the rendered pages
  e.render_browser = ''         # Chromium executable ('': Playwright's own, else one on PATH)
  e.element_threshold = 0.5
  e.bleu_target = 0.30
  e.element_f1_target = 0.85
  e.semantic_accuracy_target = 0.85
  return e


def _decode() -> ml_collections.ConfigDict:
  g = ml_collections.ConfigDict()
  g.strategy = 'greedy'         # greedy | sample | beam | mbr (inference/mbr.py)
  g.max_len = 0                 # tokens per page incl. EOS (0: data.max_seq_len)
  g.temperature = 1.0           # sample
  g.top_k = 0                   # sample: only the k most likely tokens (0: all)
  g.top_p = 1.0                 # sample: nucleus, the smallest set with this much probability
  g.beam_size = 4               # beam
  g.length_penalty = 0.6        # beam: log_prob / ((5 + length) / 6) ** length_penalty
  g.candidates = 8              # mbr: the greedy page + candidates - 1 samples, one kept
  g.seed = 0                    # sample: the same seed gives the same pages
  return g


def _parallel() -> ml_collections.ConfigDict:
  p = ml_collections.ConfigDict()
  p.mode = 'jit'                # jit: one program over a (data, fsdp) mesh; pmap: data parallel
  p.fsdp = 1                    # jit: shard params/optimizer state over this many devices
  p.data = 0                    # jit: data-parallel size (0: all devices / fsdp)
  p.cpu_devices = 0             # CPU backend: split the host into this many devices (0: one per
                                # core that the batch divides by; 1: one device on all cores)
  # Train CLI, Linux: glibc malloc keeps the memory XLA:CPU frees for the next step (None: only
  # when JAX will run on the CPU; training/host.py).
  p.keep_freed_host_memory = config_dict.placeholder(bool)
  p.distributed = 'off'         # off | auto (TPU pods, SLURM: JAX finds the cluster) | manual
  p.coordinator_address = ''    # manual: 'host:port' of process 0
  p.num_processes = 1           # manual
  p.process_id = 0              # manual: this process's index
  return p


def _checkpoint() -> ml_collections.ConfigDict:
  k = ml_collections.ConfigDict()
  k.max_to_keep = 2
  k.best_metric = 'targets_score'
  k.async_save = True
  k.every_steps = 0             # also checkpoint every this many steps inside an epoch (0: epoch
                                # ends only); a kill loses at most this many steps
  return k


# Fields of earlier versions, with what replaced them. A saved run's config.json may hold them:
# training-only settings, dropped when it is read back (specs.load_run_config).
RETIRED_FIELDS = {
    'loss.vocab_chunk_size': 'use loss.logits_chunk_pages (pages of logits at a time, e.g. 2)',
}

# Fields that fix the parameters' meaning: a checkpoint trained with other values cannot be
# resumed or evaluated under this config (checked against the config saved in the checkpoint).
ARCHITECTURE_FIELDS = ('model.vocab_size', 'model.num_semantic_classes', 'model.num_element_types',
                       'model.d_model', 'model.num_heads', 'model.num_layers',
                       'model.num_unique_layers', 'model.mlp_dim', 'model.tie_detail_head',
                       'model.encoder_layers', 'data.feature_dim', 'data.max_seq_len',
                       'data.patch_size', 'data.max_patches')


def architecture(config: ml_collections.ConfigDict) -> dict:
  """{field: value} of ARCHITECTURE_FIELDS: what a restored checkpoint's saved config must match."""
  flat = flatten(config.to_dict())
  return {f: flat[f] for f in ARCHITECTURE_FIELDS}


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'model.d_model': 768, ...} of a nested dict (or ConfigDict.to_dict())."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def load_file(path: str | os.PathLike, *args) -> ml_collections.ConfigDict:
  """`get_config(*args)` of a config file, as `--config path[:arg]` would give (no flags needed).
  A file that is missing, does not compile, has no get_config, or whose get_config raises or
  returns something else than a ConfigDict: ConfigError, one line naming the file (and line)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConfigError(f'{path}: no such config file')
  spec = importlib.util.spec_from_file_location(f'_config_{os.path.basename(path)}', path)
  if spec is None:
    raise ConfigError(f'{path}: not a Python config file (configs/*.py)')
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f'{path}:{e.lineno}: {type(e).__name__}: {e.msg}') from None
  except Exception as e:  # noqa: BLE001 - any error of the user's file: named in one line
    raise _file_error(path, e) from None
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigError(f'{path}: defines no get_config() (a config file returns its ConfigDict '
                      'from get_config)')
  try:
    config = module.get_config(*args)
  except Exception as e:  # noqa: BLE001
    raise _file_error(path, e) from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'{path}: get_config() returned {type(config).__name__}, not a ConfigDict')
  return config


def _file_error(path: str, error: Exception) -> ConfigError:
  """A config file's error as one line: `path:line: Type: message`, the line being the file's
  last frame in the traceback (the error's own message joined onto one line)."""
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if os.path.abspath(f.filename) == os.path.abspath(path)]
  where = f'{path}:{frames[-1].lineno}' if frames else path
  message = ' '.join(str(error).split())
  return ConfigError(f'{where}: {type(error).__name__}: {message}')
