"""Your own pages: HTML -> labels, the BPE, prepare (incl. broken pages), records, the 'files'
source, and its config checks. The corpus is written by the tests (no downloads)."""
from __future__ import annotations

import json
import os
import shutil

import jsonschema
import numpy as np
import pytest

from phase1_jax import config as config_lib
from phase1_jax import config_validation, specs
from phase1_jax.data import (
  assemble,
  bpe,
  html_labels,
  html_pages,
  pipeline,
  prepare,
  records,
  synthetic,
  vocab,
)
from phase1_jax.inference import generation
from phase1_jax.training import loop
from tests.test_data import DTYPES, KEYS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURE_DIM, MAX_PATCHES = 16, 16     # configs/tiny.py's feature width and 4 x 4 patches
KEYWORDS = html_labels.LabelScheme(class_keywords=True)

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


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root, feats = tmp_path_factory.mktemp('html'), tmp_path_factory.mktemp('features')
  pages = write_corpus(str(root), features=str(feats))
  out = str(tmp_path_factory.mktemp('prepared') / 'data')
  meta = prepare.prepare(str(root), out, vocab_size=320, val_fraction=0.2, workers=1,
                         features_dir=str(feats), records_per_shard=4, progress=False)
  return str(root), out, meta, pages, str(feats)


def files_config(out):
  config = config_lib.load_file(os.path.join(REPO, 'configs', 'tiny.py'))
  config.data.name, config.data.path = 'files', out
  meta = records.read_metadata(out)
  config.model.num_semantic_classes = len(meta['semantic_classes'])
  config.model.num_element_types = len(meta['element_types'])
  return config


# ------------------------------------------------------------------------------ HTML mapping

ELEMENTS = [
    ('<div role="button">Go</div>', 'button'), ('<button>Go</button>', 'button'),
    ('<input type="submit">', 'button'), ('<a href="/x">x</a>', 'link'),
    ('<img src="a.png">', 'image'), ('<input type="email">', 'input'),
    ('<input type="checkbox">', 'checkbox'), ('<input type="radio">', 'radio'),
    ('<input type="range">', 'slider'), ('<input type="search">', 'search_bar'),
    ('<div class="swiper-container main-carousel">x</div>', 'carousel'),
    ('<div aria-roledescription="carousel">x</div>', 'carousel'),
    ('<details><summary>q</summary>a</details>', 'accordion'),
    ('<div class="photo-gallery">x</div>', 'gallery'), ('<video></video>', 'video'),
    ('<iframe src="https://www.youtube.com/embed/1"></iframe>', 'video'),
    ('<iframe src="https://maps.google.com/x"></iframe>', 'map'), ('<table></table>', 'table'),
    ('<ol><li>a</li></ol>', 'list'), ('<div class="product-card">x</div>', 'card'),
    ('<article>x</article>', 'card'), ('<div role="dialog">x</div>', 'modal'),
    ('<div class="modal fade">x</div>', 'modal'), ('<ul role="tablist"></ul>', 'tabs'),
    ('<div class="dropdown">x</div>', 'dropdown'),
    ('<ol class="breadcrumb"><li>a</li></ol>', 'breadcrumb'),
    ('<ul class="pagination"><li>1</li></ul>', 'pagination'),
    ('<span class="badge">new</span>', 'badge'), ('<img class="avatar">', 'avatar'),
    ('<svg><path d="M0"/></svg>', 'icon'), ('<i class="fa fa-x"></i>', 'icon'),
    ('<h4>t</h4>', 'heading'), ('<p>t</p>', 'paragraph'), ('<textarea></textarea>', 'textarea'),
    ('<select><option>a</option></select>', 'select'), ('<progress></progress>', 'progress_bar'),
    ('<div role="progressbar"></div>', 'progress_bar'),
    ('<span role="tooltip">t</span>', 'tooltip'),
    ('<div id="map"></div>', 'map'),
]


@pytest.mark.parametrize('html,expected', ELEMENTS, ids=[e for _, e in ELEMENTS])
def test_element_type_mapping_with_class_keywords(html, expected):
  page = html_pages.parse_page(f'<body>{html}</body>'.encode(), scheme=KEYWORDS)
  etype = vocab.ELEMENT_TYPES.index(expected)
  assert etype in page.element_types, (html, [vocab.ELEMENT_TYPES[e] for e in page.element_types])
  # The element is written with its type's canonical open tag (one BPE token).
  assert page.markup.startswith(bpe.ELEMENT_OPEN_TOKENS[etype]), page.markup


def test_unmapped_elements_keep_their_tags():
  page = html_pages.parse_page(b'<body><div class="card-title"><span>x</span><abbr>y</abbr>'
                               b'<iframe src="/ad"></iframe></div></body>')
  assert page.element_types == []
  assert page.markup == ('<div class="card-title"><span >x</span><abbr >y</abbr>'
                         '<iframe ></iframe></div>')


LANDMARKS = [
    ('<nav><a>a</a></nav>', 'navbar'), ('<nav aria-label="Breadcrumb"><a>a</a></nav>',
                                        'breadcrumb_bar'),
    ('<header><a>a</a><a>b</a><a>c</a></header>', 'navbar'),
    ('<header><h1>Big title</h1><p>x</p></header>', 'hero'), ('<footer>x</footer>', 'footer'),
    ('<div role="contentinfo">x</div>', 'footer'), ('<aside>x</aside>', 'sidebar_menu'),
    ('<form><input name="u"><input type="password"></form>', 'login_form'),
    ('<form><input type="password"><input type="password"></form>', 'signup_form'),
    ('<form><textarea></textarea></form>', 'contact_form'),
    ('<form><input type="email"><button>Go</button></form>', 'newsletter'),
    ('<div role="search"><input></div>', 'search_header'),
    ('<section class="pricing-section">x</section>', 'pricing_table'),
    ('<section id="testimonials">x</section>', 'testimonials'),
    ('<section class="cookie-consent">x</section>', 'cookie_banner'),
    ('<section><video></video></section>', 'video_player'),
    ('<section><img><img><img></section>', 'image_gallery'),
    ('<main><p>x</p></main>', 'feature_list'),
]


@pytest.mark.parametrize('html,expected', LANDMARKS, ids=[e for _, e in LANDMARKS])
def test_section_class_mapping_with_class_keywords(html, expected):
  page = html_pages.parse_page(f'<body>{html}<p>after</p></body>'.encode(), scheme=KEYWORDS)
  cls = vocab.SEMANTIC_CLASSES.index(expected)
  end = page.markup.index('<p >after')
  # Every character of the section carries its class; the paragraph after it none.
  np.testing.assert_array_equal(page.char_classes_N[:end], cls)
  assert (page.char_classes_N[end:] == -1).all()


def test_nested_sections_innermost_wins():
  page = html_pages.parse_page(b'<body><main><section class="faq"><h2>Q</h2></section>'
                               b'<p>home</p></main><button>buy</button></body>', scheme=KEYWORDS)
  m, c = page.markup, page.char_classes_N
  faq, main = vocab.SEMANTIC_CLASSES.index('faq_accordion'), c[0]
  assert c[m.index('<section')] == faq and c[m.index('<h2 ')] == faq
  assert c[m.index('<p ')] == main != faq and c[m.index('<button ')] == -1
  t = vocab.ELEMENT_TYPES.index
  assert page.element_types == sorted([t('heading'), t('paragraph'), t('button')])


def test_normalisation_drops_scripts_styles_comments_and_whitespace():
  page = html_pages.parse_page(b'<html><head><style>x{}</style></head><body>\n  <p>a   b\n c'
                               b'<!-- note --><script>alert("<p>")</script></p>\t<noscript>n'
                               b'</noscript><input type="hidden" value="t"></body></html>')
  assert page.markup == '<p >a b c</p>'


@pytest.mark.parametrize('data', [b'', b'   \n', b'<html></html>', b'<!-- only -->'])
def test_pages_without_content_raise_page_error(data):
  with pytest.raises(html_pages.PageError):
    html_pages.parse_page(data)


@pytest.mark.parametrize('data', [
    b'<div<<p>>x</td></tr><<<', b'<p>unclosed <b><i>deep', b'\xff\xfe<p>\x00bytes</p>',
    b'<table><td>cell<tr><form><select><option>o</table>', '<p>caf\xe9 \u4e2d\u6587</p>'.encode()])
def test_broken_html_is_repaired_not_fatal(data):
  page = html_pages.parse_page(data)
  assert page.markup and len(page.char_classes_N) == len(page.markup)


# ---------------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_and_reserved_ids(prepared):
  root, out, meta, pages, _ = prepared
  tok = bpe.load(os.path.join(out, records.TOKENIZER_FILE))
  assert [tok.token_to_id(t) for t in bpe.SPECIAL_TOKENS] == [0, 1, 2, 3]
  assert meta['element_types'] == list(html_pages.SEMANTIC.element_types)
  assert meta['element_open_tag_ids'] == [4 + vocab.ELEMENT_TYPES.index(t)
                                          for t in meta['element_types']]
  assert meta['vocab_size'] == tok.get_vocab_size() <= 320
  rng = np.random.default_rng()
  for rel in rng.choice(sorted(p for p, h in pages.items() if h), 4, replace=False):
    markup = html_pages.parse_page(pages[rel].encode()).markup
    ids = tok.encode(markup).ids
    assert bpe.decode(tok, [vocab.BOS_ID, *ids, vocab.EOS_ID, 7, 9]) == markup
  # Each element open tag is one id, and never matched inside another tag name.
  for etype, text in enumerate(bpe.ELEMENT_OPEN_TOKENS):
    assert tok.encode(text + 'class="x">').ids[0] == 4 + etype
  ids = tok.encode('<abbr ><iframe ><address >x</address><input >').ids
  assert set(ids) & set(meta['element_open_tag_ids']) == {tok.token_to_id('<input ')}
  text = 'unseen caf\u00e9 \u4e2d\u6587 \U0001F600'
  assert bpe.decode(tok, tok.encode(text).ids) == text and vocab.UNK_ID not in tok.encode(text).ids


# -------------------------------------------------------------------------- prepare + records

def test_prepare_writes_splits_and_reports_skipped_pages(prepared):
  root, out, meta, pages, _ = prepared
  assert json.load(open(os.path.join(out, 'dataset.json'))) == meta
  s, n = meta['summary'], {k: v['num_records'] for k, v in meta['splits'].items()}
  assert s['pages_found'] == len(pages) and s['pages_skipped'] == 1
  assert s['skipped'] == [{'path': 'sub/empty.html', 'reason': 'empty file'}]
  assert n['train'] + n['val'] == s['pages_written'] == len(pages) - 1 and n['val'] >= 1
  assert all(len(v['shards']) == -(-n[k] // 4) for k, v in meta['splits'].items())
  assert s['tokens'] == sum(len(records.FilePages(out, k, max_seq_len=8, num_patches=1).record(i)
                                ['tokens']) for k in n for i in range(n[k]))
  assert sum(s['element_type_pages'].values()) > 0 and 'outside_sections' in s[
      'semantic_class_tokens']
  assert sorted(os.listdir(out)) == ['dataset.json', 'tokenizer.json', 'train', 'val']
  assert not os.path.exists(out + '.incomplete')
  assert meta['input'] == 'features' and meta['feature_dim'] == FEATURE_DIM
  assert meta['semantic_classes'] == list(html_labels.LANDMARK_CLASSES)


def test_records_match_the_pages(prepared):
  root, out, meta, pages, feats = prepared
  tok = bpe.load(os.path.join(out, records.TOKENIZER_FILE))
  seen = set()
  for split in ('train', 'val'):
    src = records.FilePages(out, split, max_seq_len=48, num_patches=16)
    for i in range(len(src)):
      rec = src.record(i)
      seen.add(rec['source_id'])
      page = html_pages.parse_page(pages[rec['source_id']].encode())
      enc = tok.encode(page.markup)
      np.testing.assert_array_equal(rec['tokens'], enc.ids)
      np.testing.assert_array_equal(
          rec['semantic_labels'], page.char_classes_N[[a for a, _ in enc.offsets]])
      assert sorted(np.flatnonzero(rec['element_labels'])) == page.element_types
      user = np.load(os.path.join(feats, os.path.splitext(rec['source_id'])[0] + '.npy'))
      np.testing.assert_array_equal(rec['features'], user.astype(np.float16))
      assert assemble.split_of(assemble.markup_hash(page.markup), 0.2) == split or split == 'val'
  assert seen == {p for p, h in pages.items() if h}


def random_record(rng, n_tokens, n_patches, feature_dim=16):
  return {'features': rng.standard_normal((n_patches, feature_dim)).astype(np.float16),
          'tokens': rng.integers(4, 300, n_tokens).astype(np.int32),
          'semantic_labels': rng.integers(-1, 50, n_tokens).astype(np.int8),
          'element_labels': (rng.random(30) < 0.3).astype(np.uint8),
          'source_id': f'page{rng.integers(1000)}.html'}


def test_record_round_trip_through_shards(tmp_path):
  rng = np.random.default_rng()
  written = [random_record(rng, int(rng.integers(1, 80)), int(rng.integers(1, 30)))
             for _ in range(7)]
  w = records.ShardWriter(str(tmp_path), 'train', records_per_shard=3)
  for r in written:
    w.write(r)
  w.close()
  assert w.shards == [f'train/train-0000{k}.array_record' for k in range(3)] and w.count == 7
  meta = {'format': records.FORMAT, 'version': records.VERSION,
          'splits': {'train': {'shards': w.shards}, 'val': {'shards': []}}}
  records.write_metadata(str(tmp_path), meta)
  src = records.FilePages(str(tmp_path), 'train', max_seq_len=40, num_patches=12)
  assert len(src) == 7
  for i in rng.permutation(7):   # random access, any order
    got = src.record(int(i))
    assert got['source_id'] == written[i]['source_id']
    for k in records.ARRAY_FIELDS:
      np.testing.assert_array_equal(got[k], written[i][k])
      assert got[k].dtype == written[i][k].dtype


@pytest.mark.parametrize('n_tokens,n_patches', [(5, 3), (39, 12), (60, 30)])
def test_example_matches_synthetic_layout(n_tokens, n_patches):
  rng = np.random.default_rng()
  rec = random_record(rng, n_tokens, n_patches)
  t, p = 40, 12
  ex = records.to_example(rec, max_seq_len=t, num_patches=p)
  syn = synthetic.SyntheticPages(synthetic.PageSpec(max_seq_len=t, grid_rows=4, grid_cols=3,
                                                    feature_dim=16), num_samples=1, seed=0)[0]
  assert set(ex) == set(KEYS)
  for k in KEYS:
    assert ex[k].shape == syn[k].shape and ex[k].dtype == DTYPES[k], k
  n = min(n_tokens, t - 1)
  assert ex['inputs'][0] == vocab.BOS_ID and ex['targets'][n] == vocab.EOS_ID
  np.testing.assert_array_equal(ex['targets'][:n], rec['tokens'][:n])
  np.testing.assert_array_equal(ex['inputs'][1:n + 1], rec['tokens'][:n])
  np.testing.assert_array_equal(ex['target_mask'], np.arange(t) <= n)
  np.testing.assert_array_equal(ex['semantic_mask'][:n], rec['semantic_labels'][:n] >= 0)
  assert not ex['semantic_mask'][n:].any()
  np.testing.assert_array_equal(ex['feature_mask'], np.arange(p) < min(n_patches, p))
  np.testing.assert_array_equal(ex['features'][:min(n_patches, p)],
                                rec['features'][:p].astype(np.float32))


def test_element_labels_follow_the_window_of_a_long_page(prepared):
  """A label holds only when its type's open tag is among the tokens the model is scored on."""
  _, out, meta, _, _ = prepared
  open_ids = np.array(meta['element_open_tag_ids'])
  cut = 0
  for t in (8, 24, 512):
    src = records.FilePages(out, 'train', max_seq_len=t, num_patches=4)
    for i in range(len(src)):
      rec, ex = src.record(i), src[i]
      window = rec['tokens'][:t - 1]
      np.testing.assert_array_equal(ex['element_labels'], np.isin(open_ids, window))
      cut += int(ex['element_labels'].sum() < rec['element_labels'].sum())
  assert cut > 0          # short windows do drop labels of this corpus


def test_prepare_errors_are_one_line_and_leave_no_output(tmp_path):
  (tmp_path / 'empty').mkdir()
  feats = dict(features_dir=str(tmp_path))
  cases = [(str(tmp_path / 'empty'), 'no .html/.htm files'), (str(tmp_path / 'nope'),
                                                                'not a directory')]
  for html_dir, words in cases:
    with pytest.raises(prepare.PrepareError, match=words) as info:
      prepare.prepare(html_dir, str(tmp_path / 'out'), progress=False, **feats)
    assert '\n' not in str(info.value) and html_dir in str(info.value)
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'a.html').write_text('   ')
  with pytest.raises(prepare.PrepareError, match='none of 1 pages.*a.html: empty file'):
    prepare.prepare(str(tmp_path / 'bad'), str(tmp_path / 'out2'), progress=False, **feats)
  assert not os.path.exists(tmp_path / 'out2') and not os.path.exists(tmp_path / 'out2.incomplete')
  with pytest.raises(prepare.PrepareError, match='--vocab_size'):
    prepare.prepare(str(tmp_path / 'bad'), str(tmp_path / 'o3'), vocab_size=60000, **feats)
  with pytest.raises(prepare.PrepareError, match='--out .*not empty'):
    prepare.prepare(str(tmp_path / 'bad'), str(tmp_path / 'bad' / 'a.html'), **feats)
  with pytest.raises(prepare.PrepareError, match='--render or --features_dir'):
    prepare.prepare(str(tmp_path / 'bad'), str(tmp_path / 'o4'))
  with pytest.raises(prepare.PrepareError, match='--shard_index 2'):
    prepare.prepare(str(tmp_path / 'bad'), str(tmp_path / 'o5'), num_shards=2, shard_index=2,
                    **feats)


def test_binary_files_are_skipped_with_their_reason(tmp_path):
  """Random bytes named .html: skipped as 'not text', not parsed into pages of junk tokens."""
  root, feats = tmp_path / 'html', tmp_path / 'feats'
  pages = write_corpus(str(root), n_pages=4, features=str(feats))
  rng = np.random.default_rng(0)
  (root / 'junk.html').write_bytes(rng.bytes(100_000))
  write_features(str(feats), {'junk.html': None}, rng)
  meta = prepare.prepare(str(root), str(tmp_path / 'out'), vocab_size=300, workers=1,
                         features_dir=str(feats), progress=False)
  skipped = {s['path']: s['reason'] for s in meta['summary']['skipped']}
  assert skipped == {'junk.html': 'not text: binary content (NUL bytes)',
                     'sub/empty.html': 'empty file'}
  assert meta['summary']['pages_written'] == len(pages) - 1


@pytest.mark.parametrize('data,binary', [
    (bytes(np.random.default_rng(0).integers(1, 256, 5000, dtype=np.uint8)), True),   # no NUL
    (b'<p>a\x00b</p>', True), ('<p>' + '\ufffd' * 50 + '</p>', True),    # a DOM of junk bytes
    ('<p>caf\xe9</p>'.encode('latin-1'), False), ('<p>\x0ctab\there</p>'.encode(), False),
    ('<p>x</p>'.encode('utf-16'), False), ('<p>\u4e2d\u6587</p>', False)])
def test_binary_content_is_told_from_text_in_any_encoding(data, binary):
  assert (html_pages.binary_reason(data) is not None) == binary


def test_failed_merge_leaves_the_parts_and_no_dataset(prepared, tmp_path, monkeypatch):
  """A merge that fails leaves OUT as it was (the parts, no dataset.json, no staging folder), and
  a failed part of a sharded run deletes what it wrote."""
  root, _, _, _, feats = prepared
  shared = str(tmp_path / 'sharded')
  for i in (0, 1):
    prepare.prepare(root, shared, vocab_size=320, features_dir=feats, progress=False,
                    num_shards=2, shard_index=i)
  parts = sorted(os.listdir(os.path.join(shared, prepare.PARTS_DIR)))

  def fail(*args, **kwargs):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(records.ShardWriter, 'write', fail)
  with pytest.raises(OSError):
    prepare.merge(shared, vocab_size=320, progress=False)
  assert sorted(os.listdir(shared)) == [prepare.PARTS_DIR]
  assert sorted(os.listdir(os.path.join(shared, prepare.PARTS_DIR))) == parts
  monkeypatch.setattr(prepare, '_converted', fail)
  with pytest.raises(OSError):
    prepare.prepare(root, shared, vocab_size=320, features_dir=feats, progress=False,
                    num_shards=2, shard_index=1)
  assert sorted(os.listdir(os.path.join(shared, prepare.PARTS_DIR))) == [
      p for p in parts if '00001' not in p]


def copy_dataset(prepared, tmp_path):
  """A private copy of the prepared directory and the path of its second train shard."""
  out = str(tmp_path / 'data')
  shutil.copytree(prepared[1], out)
  return out, os.path.join(out, records.read_metadata(out)['splits']['train']['shards'][1])


@pytest.mark.parametrize('damage,words', [
    (lambda f, n: f.truncate(n // 2), 'not a readable ArrayRecord shard'),
    (lambda f, n: (f.seek(n // 2), f.write(b'\xa5' * 64)), 'not a readable ArrayRecord shard'),
    (lambda f, n: (f.seek(f.read().index(b'\0' * 64) // 2), f.write(b'\xa5' * 16)),
     r'record \d+ is corrupt \(Corrupted Riegeli')])
def test_damaged_shard_is_named_when_the_split_opens(prepared, tmp_path, damage, words):
  """Truncated, its footer overwritten, or a record garbled (the records fill the file's start):
  FilePages names the shard (and the record) when it is opened, before anything would compile."""
  out, shard = copy_dataset(prepared, tmp_path)
  with open(shard, 'r+b') as f:
    damage(f, os.path.getsize(shard))
  with pytest.raises(records.DatasetError, match=words) as info:
    records.FilePages(out, 'train', max_seq_len=48, num_patches=16)
  assert str(info.value).startswith(f'{shard}: ') and '\n' not in str(info.value)


def test_garbled_record_of_a_large_split_is_named_when_read(prepared, tmp_path, monkeypatch):
  """A split too large to read whole when opened checks each shard's first and last records; a
  garbled record between them is a DataError naming its shard and index when the loader reads
  it, in the main thread."""
  out, shard = copy_dataset(prepared, tmp_path)
  data = open(shard, 'rb').read()
  with open(shard, 'r+b') as f:
    f.seek(data.index(b'\0' * 64) // 2)      # inside the records (the footer is at the end)
    f.write(b'\xa5' * 16)
  with pytest.raises(records.DatasetError, match='corrupt'):
    records.check_shard(shard, every_record=True)
  monkeypatch.setattr(records, 'VERIFY_ALL_BYTES', 0)
  source = records.FilePages(out, 'train', max_seq_len=48, num_patches=16)
  with pytest.raises(pipeline.DataError, match=rf'^{shard}: record \d+ is corrupt \(Corrupted'):
    for _ in pipeline.train_iterator(source, batch_size=2, seed=0, epoch=0):
      pass


@pytest.mark.parametrize('edit,words', [
    (lambda m: [1, 2], 'holds a JSON list'), (lambda m: {**m, 'splits': None}, "no 'splits'"),
    (lambda m: {k: v for k, v in m.items() if k != 'splits'}, "no 'splits'"),
    (lambda m: {**m, 'splits': {'train': m['splits']['train']}}, 'splits.val'),
    (lambda m: {**m, 'vocab_size': 'many'}, "vocab_size 'many' is not a positive integer"),
    (lambda m: {k: v for k, v in m.items() if k != 'semantic_classes'}, "no 'semantic_classes'")])
def test_damaged_dataset_json_is_named_in_one_line(prepared, tmp_path, edit, words):
  out, _ = copy_dataset(prepared, tmp_path)
  with open(os.path.join(out, records.METADATA_FILE)) as f:
    meta = json.load(f)
  with open(os.path.join(out, records.METADATA_FILE), 'w') as f:
    json.dump(edit(meta), f)
  with pytest.raises(records.DatasetError, match=words) as info:
    records.read_metadata(out, complete=True)
  assert '\n' not in str(info.value)
  with pytest.raises(config_lib.ConfigError, match=words):
    config_validation.validate(files_config_unchecked(out))


def files_config_unchecked(out):
  """files_config without reading dataset.json (it may be damaged)."""
  config = config_lib.load_file(os.path.join(REPO, 'configs', 'tiny.py'))
  config.data.name, config.data.path = 'files', out
  return config


def without_timing(meta):
  timing = ('pages_per_second', 'convert_seconds')
  return {**meta, 'summary': {k: v for k, v in meta['summary'].items() if k not in timing}}


def assert_same_records(dir_a, dir_b):
  """Both directories hold the same records in each split (in any order)."""
  for split in ('train', 'val'):
    a, b = ({r['source_id']: r for r in map(src.record, range(len(src)))}
            for src in (records.FilePages(d, split, max_seq_len=48, num_patches=16)
                        for d in (dir_a, dir_b)))
    assert sorted(a) == sorted(b)
    for page in a:
      for k in records.ARRAY_FIELDS:
        np.testing.assert_array_equal(a[page][k], b[page][k])


def test_parallel_workers_write_the_same_dataset(prepared, tmp_path):
  root, out, meta, _, feats = prepared
  again = prepare.prepare(root, str(tmp_path / 'par'), vocab_size=320, val_fraction=0.2,
                          workers=2, records_per_shard=4, progress=False, features_dir=feats)
  assert without_timing(again) == without_timing(meta)
  assert_same_records(out, str(tmp_path / 'par'))


def test_sharded_conversion_then_merge_equals_one_run(prepared, tmp_path):
  root, out, meta, _, feats = prepared
  shared = str(tmp_path / 'sharded')
  for i in (1, 0, 2):        # any order, as on separate machines
    assert prepare.prepare(root, shared, vocab_size=320, val_fraction=0.2, workers=1,
                           features_dir=feats, progress=False, num_shards=3, shard_index=i) is None
    if i == 0:
      with pytest.raises(prepare.PrepareError, match=r'parts \[2\] of 3 are not written'):
        prepare.merge(shared, vocab_size=320, val_fraction=0.2, records_per_shard=4)
  merged = prepare.merge(shared, vocab_size=320, val_fraction=0.2, records_per_shard=4,
                         progress=False)
  assert without_timing(merged)['splits'] == meta['splits']
  assert merged['summary']['skipped'] == meta['summary']['skipped']
  assert_same_records(out, shared)
  assert not os.path.exists(os.path.join(shared, prepare.PARTS_DIR))


def test_redirect_stubs_skipped_and_duplicates_share_a_split(tmp_path):
  root, feats = tmp_path / 'html', tmp_path / 'feats'
  page = '<body><main><h1>Title {}</h1><p>Some text</p></main></body>'
  pages = {f'copy{i}.html': page.format('same') for i in range(6)}
  pages.update({f'other{i}.html': page.format(i) for i in range(30)})
  pages['moved.html'] = ('<html><head><meta http-equiv="refresh" content="0; url=new.html">'
                         '</head><body>Redirecting to <a href="new.html">new</a></body></html>')
  for rel, html in pages.items():
    os.makedirs(root, exist_ok=True)
    (root / rel).write_text(html)
  write_features(str(feats), pages, np.random.default_rng())
  meta = prepare.prepare(str(root), str(tmp_path / 'out'), vocab_size=300, val_fraction=0.3,
                         workers=1, features_dir=str(feats), progress=False)
  s = meta['summary']
  assert s['skipped'] == [{'path': 'moved.html', 'reason': 'redirect stub (meta refresh to '
                                                           'new.html)'}]
  assert s['duplicate_pages'] == 5 and {d['same_as'] for d in s['duplicates']} == {'copy0.html'}
  sides = {}
  for split in ('train', 'val'):
    src = records.FilePages(str(tmp_path / 'out'), split, max_seq_len=8, num_patches=1)
    sides.update({src.record(i)['source_id']: split for i in range(len(src))})
  assert len({sides[f'copy{i}.html'] for i in range(6)}) == 1
  assert set(sides.values()) == {'train', 'val'}


def test_stored_tokens_are_capped_and_labels_follow_them(prepared, tmp_path):
  root, out, meta, pages, feats = prepared
  capped = prepare.prepare(root, str(tmp_path / 'cap'), vocab_size=320, val_fraction=0.2,
                           workers=1, features_dir=feats, progress=False, max_tokens=12)
  assert capped['summary']['pages_cut_at_max_tokens'] > 0
  tok = bpe.load(os.path.join(tmp_path / 'cap', records.TOKENIZER_FILE))
  open_ids = np.array(capped['element_open_tag_ids'])
  for split in ('train', 'val'):
    src = records.FilePages(str(tmp_path / 'cap'), split, max_seq_len=48, num_patches=16)
    for i in range(len(src)):
      rec = src.record(i)
      # The parse stops early too: memory per page stays bounded.
      page = html_pages.parse_page(pages[rec['source_id']].encode(),
                                   max_chars=12 * prepare.CHARS_PER_TOKEN_CAP)
      full = tok.encode(page.markup).ids
      np.testing.assert_array_equal(rec['tokens'], full[:12])
      np.testing.assert_array_equal(rec['element_labels'], np.isin(open_ids, full[:12]))


def test_each_process_reads_its_slice_of_every_global_batch(prepared):
  """Two processes each yield half of every global batch of 4; together they are the global
  batches of one process, page for page (as sets per batch)."""
  config = files_config(prepared[1])
  source = pipeline.make_source(specs.data_spec(config), 'train')
  rows = lambda batch: sorted(tuple(t) for t in batch['targets'])
  whole = [rows(b) for b in pipeline.train_iterator(source, batch_size=4, seed=2, epoch=1)]
  halves = [list(pipeline.train_iterator(source, batch_size=4, seed=2, epoch=1, shard_index=i,
                                         shard_count=2)) for i in (0, 1)]
  assert len(whole) == pipeline.steps_per_epoch(source, 4) == len(source) // 4 >= 2
  assert [len(h) for h in halves] == [len(whole)] * 2
  for k, batch in enumerate(whole):
    assert all(len(h[k]['targets']) == 2 for h in halves)
    assert sorted(rows(halves[0][k]) + rows(halves[1][k])) == batch


def test_user_features_by_file_name(tmp_path):
  root, feats = tmp_path / 'html', tmp_path / 'feats'
  pages = write_corpus(str(root), n_pages=5, seed=3)
  rng = np.random.default_rng()
  arrays = {}
  for rel in pages:
    if pages[rel] and rel != 'page0.html':     # page0 has no features: skipped, reported
      arrays[rel] = rng.standard_normal((int(rng.integers(2, 9)), 6)).astype(np.float32)
      os.makedirs(os.path.dirname(feats / rel), exist_ok=True)
      np.save(feats / (os.path.splitext(rel)[0] + '.npy'), arrays[rel])
  out = str(tmp_path / 'out')
  meta = prepare.prepare(str(root), out, vocab_size=300, features_dir=str(feats), workers=1,
                         progress=False)
  assert meta['feature_dim'] == 6 and meta['input'] == 'features'
  assert {x['path'] for x in meta['summary']['skipped']} == {'sub/empty.html', 'page0.html'}
  for split in ('train', 'val'):
    src = records.FilePages(out, split, max_seq_len=16, num_patches=8)
    for i in range(len(src)):
      rec = src.record(i)
      np.testing.assert_array_equal(rec['features'], arrays[rec['source_id']].astype(np.float16))


# ------------------------------------------------------------------------- pipeline + config

def test_files_source_through_the_pipeline(prepared):
  _, out, meta, _, _ = prepared
  config = files_config(out)
  config_validation.validate(config)
  train = pipeline.make_source(specs.data_spec(config), 'train')
  assert len(train) == meta['splits']['train']['num_records']
  assert (pipeline.element_open_tag_ids(specs.data_spec(config))
          == tuple(meta['element_open_tag_ids']))
  batches = list(pipeline.train_iterator(train, batch_size=4, seed=0, epoch=0))
  assert len(batches) == pipeline.steps_per_epoch(train, 4) == len(train) // 4
  t, p = config.data.max_seq_len, config.data.grid_rows * config.data.grid_cols
  for b in batches:
    assert {k: v.shape[1:] for k, v in b.items()} == {
        'features': (p, 16), 'feature_mask': (p,), 'inputs': (t,), 'targets': (t,),
        'target_mask': (t,), 'semantic_labels': (t,), 'semantic_mask': (t,),
        'element_labels': (len(meta['element_types']),)}
    assert all(b[k].dtype == DTYPES[k] for k in KEYS)
  it = pipeline.train_iterator(train, batch_size=2, seed=1, epoch=0)
  next(it)
  state, expected = it.get_state(), next(it)
  again = pipeline.train_iterator(train, batch_size=2, seed=1, epoch=0)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)['targets'], expected['targets'])


@pytest.mark.parametrize('field,value,words', [
    ('data.path', '', 'data.path'), ('data.path', '/no/such/dir', 'dataset.json: not found'),
    ('model.vocab_size', 100, 'model.vocab_size'), ('data.feature_dim', 64, 'data.feature_dim'),
    ('model.num_element_types', 10, 'model.num_element_types'),
    ('train.batch_size', 1000, 'train.batch_size')])
def test_files_config_errors_name_the_field(prepared, field, value, words):
  config = files_config(prepared[1])
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=words) as info:
    config_validation.validate(config)
  assert '\n' not in str(info.value) and str(info.value).startswith('config.')


def test_html_config_reads_the_prepared_directory(prepared):
  _, out, meta, _, _ = prepared
  config = config_lib.load_file(os.path.join(REPO, 'configs', 'html.py'), out)
  assert config.data.name == 'files' and config.data.path == out
  assert config.model.vocab_size % 128 == 0 and config.model.vocab_size >= meta['vocab_size']
  assert config.data.feature_dim == meta['feature_dim']
  config.data.grid_rows, config.data.grid_cols = 4, 4
  config.train.batch_size = 4
  config_validation.validate(config)
  with pytest.raises(config_lib.ConfigError, match='data.path'):
    config_validation.validate(config_lib.load_file(os.path.join(REPO, 'configs', 'html.py')))


@pytest.mark.parametrize('name', ['html.py', 'pixels_small.py', 'pixels.py'])
def test_dataset_configs_name_an_unreadable_or_mismatched_dataset_in_one_line(prepared, tmp_path,
                                                                               name):
  garbage = tmp_path / 'garbage'
  garbage.mkdir()
  (garbage / 'dataset.json').write_text('{not json')
  for path, words in ((str(garbage), 'dataset.json: unreadable'),
                      (prepared[1], 'data.patch_size' if name != 'html.py' else None)):
    config = config_lib.load_file(os.path.join(REPO, 'configs', name), path)   # never raises
    if words is None:     # html.py on a features dataset: fits
      continue
    with pytest.raises(config_lib.ConfigError, match=words) as info:
      config_validation.validate(config)
    assert '\n' not in str(info.value)


# ------------------------------------------------------------------------------------ training

def test_trains_and_evaluates_on_prepared_pages(prepared, tmp_path):
  """configs/tiny.py on the prepared pages: a few steps, eval and BLEU (over token-id strings)."""
  _, out, meta, _, _ = prepared
  config = files_config(out)
  config.train.batch_size = 4
  config.train.num_epochs = 1
  config.eval.batch_size = 4
  config.eval.bleu_samples = 2
  report = loop.train_and_evaluate(config, str(tmp_path / 'run'))
  history = json.load(open(tmp_path / 'run' / 'training_history.json'))
  steps = meta['splits']['train']['num_records'] // 4
  assert [r['step'] for r in history if r['kind'] == 'epoch'] == [steps] and steps >= 2
  assert all(np.isfinite(r['loss']) for r in history if r['kind'] == 'train')
  m = report['metrics']
  assert report['num_pages'] == meta['splits']['val']['num_records']
  for k in ('val_loss', 'val_loss_consistency', 'bleu', 'element_f1', 'semantic_accuracy'):
    assert np.isfinite(m[k]), k
  # generate on the prepared pages: records valid against the schema, markup decoded by the
  # dataset's BPE (the same text the tokenizer gives for the record's ids).
  path, n = generation.generate_pages(specs.run_spec(config), str(tmp_path / 'run'), num_samples=3,
                                      output=str(tmp_path / 'pages.jsonl'))
  schema = json.load(open(generation.SCHEMA_PATH))
  tokenizer = bpe.load(os.path.join(out, records.TOKENIZER_FILE))
  lines = [json.loads(line) for line in open(path)]
  assert n == len(lines) == min(3, meta['splits']['val']['num_records'])
  for record in lines:
    jsonschema.validate(record, schema)
    assert record['markup'] == bpe.decode(tokenizer, record['token_ids'])
