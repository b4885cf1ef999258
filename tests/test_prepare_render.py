"""prepare --render: pages rendered by Chromium become pixel records (patches, positions), the
target is the visible markup, pages that differ only in what does not render give identical
inputs, and a model trains on the result. Skipped where Playwright or Chromium is missing."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from support import skip_module_without_browser

from phase1_jax import config as config_lib
from phase1_jax import config_validation, specs
from phase1_jax.data import bpe, patches, pipeline, prepare, records, render, synthetic_html
from phase1_jax.training import loop

skip_module_without_browser()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = render.RenderSpec(width=480, max_height=900, timeout_s=20)
PATCH, MAX_PATCHES = 8, 96
# Pages that differ only in what does not change the rendering: ids, class names without CSS,
# aria-labels. Their inputs must be identical; their targets may differ.
TWINS = ('<body style="margin:8px;font:16px serif"><header{0}><h1>Title</h1></header>'
         '<nav{1}><a href="#">Home</a> <a href="#">Blog</a></nav>'
         '<main><p{2}>Some words here.</p><button{3}>Go</button>'
         '<p style="display:none">hidden text</p></main></body>')
PLAIN = TWINS.format('', '', '', '')
DRESSED = TWINS.format(' id="top" class="pricing-hero"', ' aria-label="Main menu"',
                       ' class="product-card lead"', ' id="buy" aria-label="Buy it"')


@pytest.fixture(scope='module')
def rendered(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('pages'))
  synthetic_html.write_pages(root, 10, seed=3, width=480)
  for name, html in (('twin-plain.html', PLAIN), ('twin-dressed.html', DRESSED)):
    with open(os.path.join(root, name), 'w') as f:
      f.write(html)
  with open(os.path.join(root, 'hidden.html'), 'w') as f:
    f.write('<body><p style="display:none">nothing shows</p></body>')
  out = str(tmp_path_factory.mktemp('prepared') / 'pixels')
  meta = prepare.prepare(root, out, vocab_size=400, val_fraction=0.2, render_spec=SPEC,
                         patch_size=PATCH, max_patches=MAX_PATCHES, workers=2, progress=False)
  by_id = {}
  for split in ('train', 'val'):
    src = records.FilePages(out, split, max_seq_len=64, num_patches=MAX_PATCHES)
    by_id.update({r['source_id']: r for r in map(src.record, range(len(src)))})
  return root, out, meta, by_id


def test_pixel_dataset_metadata_and_records(rendered):
  root, out, meta, by_id = rendered
  assert meta['input'] == 'pixels' and meta['patch_size'] == PATCH
  assert meta['max_patches'] == MAX_PATCHES and meta['feature_dim'] == 2 + 3 * PATCH ** 2
  assert meta['render'] == {'width': 480, 'max_height': 900, 'javascript': False}
  s = meta['summary']
  assert s['skipped'] == [{'path': 'hidden.html', 'reason': 'no visible content in <body>'}]
  assert s['pages_written'] == 12 and s['pages_per_second'] > 0
  for rel, rec in by_id.items():
    n = len(rec['patches'])
    assert rec['patches'].dtype == np.uint8 and rec['patches'].shape == (n, 3 * PATCH ** 2)
    assert rec['patch_positions'].dtype == np.int16 and 0 < n <= MAX_PATCHES
    rows, cols = rec['patch_positions'].max(0) + 1
    assert rows * cols == n, rel          # a full grid, row-major
    assert 'features' not in rec


def test_target_is_the_visible_markup(rendered):
  _, out, _, by_id = rendered
  tok = bpe.load(os.path.join(out, records.TOKENIZER_FILE))
  markup = bpe.decode(tok, by_id['twin-plain.html']['tokens'])
  assert markup == ('<header ><h2 >Title</h2></header><nav ><a >Home</a> <a >Blog</a></nav>'
                    '<main ><p >Some words here.</p><button >Go</button></main>')


def test_invisible_differences_give_identical_inputs(rendered):
  """Leakage: the model reads pixels only, so HTML that renders the same is the same input."""
  root, _, _, by_id = rendered
  plain, dressed = by_id['twin-plain.html'], by_id['twin-dressed.html']
  np.testing.assert_array_equal(plain['patches'], dressed['patches'])
  np.testing.assert_array_equal(plain['patch_positions'], dressed['patch_positions'])
  assert not np.array_equal(plain['tokens'], dressed['tokens'])   # the targets do differ
  # And the pixels are the page's: re-rendering one page gives the same patches.
  with render.Renderer(root, SPEC) as r:
    shot = r.render('twin-plain.html')
  again, _ = patches.to_patches(patches.decode_png(shot.png), patch_size=PATCH,
                                max_patches=MAX_PATCHES)
  np.testing.assert_array_equal(again, plain['patches'])


def test_patch_labels_show_where_the_sections_and_elements_are(rendered):
  """Each patch carries the section class and element type whose rendered box holds it, so the
  twins (same rendering) have the same patch labels, and the header sits above the main."""
  _, _, meta, by_id = rendered
  assert meta['patch_labels'] is True and 'patch_labels' in meta['fields']
  plain, dressed = by_id['twin-plain.html'], by_id['twin-dressed.html']
  np.testing.assert_array_equal(plain['patch_labels'], dressed['patch_labels'])
  classes, types = meta['semantic_classes'], meta['element_types']
  rows_of = lambda part, index: plain['patch_positions'][plain['patch_labels'][:, part] == index, 0]
  header, nav, main = (rows_of(0, classes.index(n)) for n in ('header', 'nav', 'main'))
  assert len(header) and len(nav) and len(main)
  assert header.max() <= nav.min() and nav.max() <= main.min()
  assert len(rows_of(1, types.index('button'))) and len(rows_of(1, types.index('heading')))
  example = records.to_example(plain, max_seq_len=64, num_patches=MAX_PATCHES)
  n = len(plain['patches'])
  np.testing.assert_array_equal(example['patch_labels'][:n], plain['patch_labels'])
  assert (example['patch_labels'][n:] == -2).all()
  unlabelled = {k: v for k, v in plain.items() if k != 'patch_labels'}
  assert (records.to_example(unlabelled, max_seq_len=64, num_patches=MAX_PATCHES)
          ['patch_labels'] == -2).all()


def test_patch_words_pair_the_visible_tokens_with_their_patches(rendered):
  """Each visible text's BPE tokens sit on the patches of its rendered box: the twins share
  them, the title's lie in the header's rows, the paragraph's in the main's."""
  _, out, meta, by_id = rendered
  assert meta['patch_words'] is True and 'patch_words' in meta['fields']
  assert meta['max_patch_words'] == max(len(r['patch_words']) for r in by_id.values())
  plain, dressed = by_id['twin-plain.html'], by_id['twin-dressed.html']
  np.testing.assert_array_equal(plain['patch_words'], dressed['patch_words'])
  words = plain['patch_words']
  assert words.dtype == np.int32 and len(words) == len(np.unique(words, axis=0))
  assert words[:, 0].max() < len(plain['patches']) and words[:, 1].max() < meta['vocab_size']
  tok = bpe.load(os.path.join(out, records.TOKENIZER_FILE))
  on_patches = {}
  for p, t in words:
    on_patches.setdefault(int(p), set()).add(int(t))
  rows_of_text = lambda text: {int(plain['patch_positions'][p, 0]) for p, ids in on_patches.items()
                               if set(tok.encode(text).ids) <= ids}
  label_rows = lambda name: set(plain['patch_positions'][
      plain['patch_labels'][:, 0] == meta['semantic_classes'].index(name), 0].tolist())
  assert rows_of_text('Title') and rows_of_text('Title') <= label_rows('header')
  assert rows_of_text('Some words here.') and rows_of_text('Some words here.') <= label_rows('main')


def test_patch_weight_needs_patch_labels(rendered, tmp_path):
  """loss.patch_weight > 0 on a pixel dataset without patch labels: one line naming its
  dataset.json, before anything compiles."""
  _, out, _, _ = rendered
  copy = str(tmp_path / 'unlabelled')
  shutil.copytree(out, copy)
  meta = records.read_metadata(copy)
  records.write_metadata(copy, {**meta, 'patch_labels': False})
  config = config_lib.load_file(os.path.join(REPO, 'configs', 'pixels_small.py'), copy)
  config.loss.patch_weight = 1.0
  with pytest.raises(pipeline.DataError, match='dataset.json: its records hold no patch labels'):
    pipeline.make_source(specs.data_spec(config), 'train')


def test_trains_on_pixels(rendered, tmp_path):
  """configs/pixels_small.py's shape, shrunk: a few steps and an evaluation from pixels."""
  _, out, meta, _ = rendered
  config = config_lib.load_file(os.path.join(REPO, 'configs', 'pixels_small.py'), out)
  assert (config.data.patch_size, config.data.max_patches) == (PATCH, MAX_PATCHES)
  c = config
  c.model.d_model, c.model.num_heads, c.model.mlp_dim = 32, 2, 64
  c.model.num_layers, c.model.num_unique_layers, c.model.encoder_layers = 2, 1, 1
  c.data.max_seq_len = 64
  c.train.batch_size, c.train.num_epochs, c.train.warmup_steps = 4, 1, 1
  c.train.stop_when_targets_met = False
  c.loss.patch_weight = c.loss.patch_words_weight = 1.0
  c.eval.batch_size, c.eval.bleu_samples, c.eval.render_samples = 4, 2, 2
  c.parallel.mode, c.checkpoint.async_save = 'jit', False
  config_validation.validate(c)
  report = loop.train_and_evaluate(c, str(tmp_path / 'run'))
  history = json.load(open(tmp_path / 'run' / 'training_history.json'))
  assert all(np.isfinite(r['loss']) for r in history if r['kind'] == 'train')
  assert all(np.isfinite(r['loss_patch']) for r in history if r['kind'] == 'train')
  assert all(np.isfinite(r['loss_patch_words']) for r in history if r['kind'] == 'train')
  metrics = report['metrics']
  for k in ('val_loss', 'val_loss_patch', 'val_loss_patch_words', 'bleu', 'element_f1',
            'semantic_accuracy', 'element_f1_teacher_forced', 'semantic_accuracy_teacher_forced'):
    assert np.isfinite(metrics[k]), k
  # On pixels the headline scores read the generated markup; the teacher-forced ones go beside.
  assert metrics['element_f1'] == metrics['element_f1_generated']
  assert metrics['semantic_accuracy'] == metrics['semantic_accuracy_generated']
  # The decoded pages were rendered and judged, at the epoch's evaluation and the final one.
  rendered_pages = min(2, records.read_metadata(out)['splits']['val']['num_records'])
  assert metrics['visual_pages'] == rendered_pages and 'pictures' not in metrics
  for name in ('render_success', 'block_match', 'text', 'position', 'colour', 'ssim', 'tree_bleu'):
    assert 0.0 <= metrics[f'visual_{name}'] <= 1.0, name
  epoch = next(r for r in history if r['kind'] == 'epoch')
  assert epoch['visual_pages'] == epoch['rendered_references'] == rendered_pages
  tags = _tensorboard_tags(str(tmp_path / 'run' / 'tensorboard'))
  assert {'val/visual_block_match', 'evaluate/visual_block_match', 'evaluate/element_f1',
          'val/generated_page_0', 'evaluate/generated_page_0'} <= tags, sorted(tags)


def _tensorboard_tags(directory: str) -> set[str]:
  """Every tag (scalars and images) in the event files of `directory`."""
  from tensorboardX.proto.event_pb2 import Event
  tags = set()
  for name in os.listdir(directory):
    with open(os.path.join(directory, name), 'rb') as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):   # TFRecords: [len u64][crc u32][data][crc u32]
      length = int.from_bytes(data[pos:pos + 8], 'little')
      tags |= {v.tag for v in Event.FromString(data[pos + 12:pos + 12 + length]).summary.value}
      pos += 16 + length
  return tags
