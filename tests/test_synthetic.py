"""phase1_jax.data.synthetic: synthetic pages (determinism, shapes, markup invariants, labels)."""
from __future__ import annotations

import numpy as np
import pytest
from support import DTYPES, KEYS

from phase1_jax.data import synthetic, vocab

SECTION_OPEN = {vocab.TOKEN_TO_ID[f'<{t}']: t for t in vocab.SECTION_TAGS}


ELEMENT_OPEN = {tok: e for e, tok in enumerate(vocab.ELEMENT_OPEN_TAG_IDS)}


CLASS_TOKEN = {vocab.TOKEN_TO_ID[f'"{c}"']: i for i, c in enumerate(vocab.SEMANTIC_CLASSES)}


WORD_IDS = {vocab.TOKEN_TO_ID[w] for w in vocab.WORDS}


GT = vocab.TOKEN_TO_ID['>']


SPECS = {
    'default': synthetic.PageSpec(),
    'short': synthetic.PageSpec(max_seq_len=24, num_semantic_classes=12, num_element_types=10,
                                grid_rows=6, grid_cols=3, feature_dim=16, min_sections=1,
                                max_sections=3, max_elements_per_section=2,
                                max_words_per_element=3),
    'wide': synthetic.PageSpec(max_seq_len=160, num_semantic_classes=50, num_element_types=30,
                               grid_rows=10, grid_cols=5, feature_dim=8, min_sections=2,
                               max_sections=5, max_elements_per_section=4,
                               max_words_per_element=1),
}


def page_tokens(page):
  """The target tokens before EOS."""
  n = int(page['target_mask'].sum()) - 1
  return [int(x) for x in page['targets'][:n]]


def parse(tokens):
  """Parses page markup into [(class, [(element type, [word ids])])], asserting it is
  well-formed: <tag class= "name" > (<etag > words </etag>)+ </tag>, section after section."""
  sections, i = [], 0
  while i < len(tokens):
    tag = SECTION_OPEN[tokens[i]]
    assert tokens[i + 1] == vocab.TOKEN_TO_ID['class=']
    cls = CLASS_TOKEN[tokens[i + 2]]
    assert tokens[i + 3] == GT
    i += 4
    elements = []
    while tokens[i] != vocab.TOKEN_TO_ID[f'</{tag}>']:
      etype = ELEMENT_OPEN[tokens[i]]
      assert tokens[i + 1] == GT
      i += 2
      words = []
      while tokens[i] in WORD_IDS:
        words.append(tokens[i])
        i += 1
      assert tokens[i] == vocab.TOKEN_TO_ID[f'</{vocab.ELEMENT_TAGS[etype]}>']
      i += 1
      elements.append((etype, words))
    i += 1
    sections.append((cls, elements))
  return sections


def assert_pages_equal(a, b):
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def differs(a, b):
  return any(not np.array_equal(a[k], b[k]) for k in a)


def test_deterministic_in_seed_split_index():
  spec = SPECS['default']
  src = synthetic.SyntheticPages(spec, num_samples=20, seed=3, split='train')
  again = synthetic.SyntheticPages(spec, num_samples=20, seed=3, split='train')
  for i in (0, 7, 19):
    assert_pages_equal(src[i], src[i])
    assert_pages_equal(src[i], again[i])
  other_seed = synthetic.SyntheticPages(spec, num_samples=20, seed=4, split='train')
  other_split = synthetic.SyntheticPages(spec, num_samples=20, seed=3, split='val')
  for i in (0, 7, 19):
    assert differs(src[i], other_seed[i])
    assert differs(src[i], other_split[i])
    assert differs(src[i], src[(i + 1) % 20])
  # Access order does not matter (a page is a function of its index alone).
  fresh = synthetic.SyntheticPages(spec, num_samples=20, seed=3, split='train')
  assert_pages_equal(fresh[19], src[19])


def test_bad_index_and_split():
  src = synthetic.SyntheticPages(SPECS['default'], num_samples=5, seed=0)
  with pytest.raises(IndexError):
    src[5]
  with pytest.raises(IndexError):
    src[-1]
  with pytest.raises(ValueError, match='split'):
    synthetic.SyntheticPages(SPECS['default'], num_samples=5, seed=0, split='dev')


@pytest.mark.parametrize('name', list(SPECS))
def test_shapes_and_dtypes(name):
  spec = SPECS[name]
  page = synthetic.SyntheticPages(spec, num_samples=3, seed=1)[2]
  p, t = spec.grid_rows * spec.grid_cols, spec.max_seq_len
  shapes = {'features': (p, spec.feature_dim), 'feature_mask': (p,), 'inputs': (t,),
            'targets': (t,), 'target_mask': (t,), 'semantic_labels': (t,), 'semantic_mask': (t,),
            'element_labels': (spec.num_element_types,)}
  assert set(page) == set(KEYS)
  for k in KEYS:
    assert page[k].shape == shapes[k], k
    assert page[k].dtype == DTYPES[k], (k, page[k].dtype)


@pytest.fixture(scope='module', params=list(SPECS))
def many_pages(request):
  spec = SPECS[request.param]
  src = synthetic.SyntheticPages(spec, num_samples=200, seed=11, split='train')
  return spec, [src[i] for i in range(len(src))]


def test_token_invariants(many_pages):
  spec, pages = many_pages
  lengths = []
  for page in pages:
    inputs, targets, tmask = page['inputs'], page['targets'], page['target_mask']
    n = int(tmask.sum())                     # tokens + EOS
    lengths.append(n)
    assert 1 < n <= spec.max_seq_len
    np.testing.assert_array_equal(tmask, np.arange(spec.max_seq_len) < n)   # a prefix
    # Teacher forcing: inputs = BOS + targets shifted right, where valid.
    assert inputs[0] == vocab.BOS_ID
    np.testing.assert_array_equal(inputs[1:n], targets[:n - 1])
    assert (inputs[n:] == vocab.PAD_ID).all() and (targets[n:] == vocab.PAD_ID).all()
    # Exactly one EOS, at the last valid position; no specials inside.
    assert (targets == vocab.EOS_ID).sum() == 1 and targets[n - 1] == vocab.EOS_ID
    assert not np.isin(targets[:n - 1], [vocab.PAD_ID, vocab.BOS_ID, vocab.UNK_ID]).any()
    assert (inputs >= 0).all() and (inputs < vocab.NUM_TOKENS).all()
    assert (targets >= 0).all() and (targets < vocab.NUM_TOKENS).all()
    # Semantic mask: the target mask minus the EOS position.
    expected = tmask.copy()
    expected[n - 1] = False
    np.testing.assert_array_equal(page['semantic_mask'], expected)
    sem = page['semantic_labels']
    assert (sem >= 0).all() and (sem < spec.num_semantic_classes).all()
    assert page['feature_mask'].all()
  assert len(set(lengths)) > 5   # lengths vary


def test_markup_structure_and_labels(many_pages):
  spec, pages = many_pages
  section_counts = []
  for page in pages:
    tokens = page_tokens(page)
    sections = parse(tokens)
    section_counts.append(len(sections))
    assert spec.min_sections <= len(sections) <= spec.max_sections
    # Section open tags counted directly in the tokens agree with the parse.
    assert sum(t in SECTION_OPEN for t in tokens) == len(sections)
    labels = []
    for cls, elements in sections:
      assert cls < spec.num_semantic_classes
      assert 1 <= len(elements) <= spec.max_elements_per_section
      for etype, words in elements:
        assert etype < spec.num_element_types
        assert len(words) <= spec.max_words_per_element
      n_tokens = 5 + sum(3 + len(w) for _, w in elements)
      labels += [cls] * n_tokens
    # Every token of a section is labelled with that section's class.
    np.testing.assert_array_equal(page['semantic_labels'][:len(tokens)], labels)
    assert (page['semantic_labels'][len(tokens):] == 0).all()
    # element_labels: multi-hot of the element open-tag tokens in the targets.
    present = {ELEMENT_OPEN[t] for t in tokens if t in ELEMENT_OPEN}
    assert present == {e for _, el in sections for e, _ in el}
    expected = np.zeros(spec.num_element_types, np.float32)
    expected[sorted(present)] = 1.0
    np.testing.assert_array_equal(page['element_labels'], expected)
    found = np.isin(vocab.ELEMENT_OPEN_TAG_IDS[:spec.num_element_types], tokens)
    np.testing.assert_array_equal(page['element_labels'] == 1.0, found)
  assert min(section_counts) < max(section_counts)


def test_features_vary_and_depend_on_noise():
  base = synthetic.PageSpec(feature_dim=16, feature_noise=0.0)
  noisy = synthetic.PageSpec(feature_dim=16, feature_noise=1.0)
  clean_src = synthetic.SyntheticPages(base, num_samples=4, seed=5)
  noisy_src = synthetic.SyntheticPages(noisy, num_samples=4, seed=5)
  for i in range(4):
    clean, noise = clean_src[i], noisy_src[i]
    f = clean['features']
    assert np.isfinite(f).all()
    assert f.std(axis=0).min() > 0.1 and f.std(axis=1).min() > 0.1   # not constant
    assert len(np.unique(f.round(4), axis=0)) == f.shape[0]           # every patch distinct
    diff = noise['features'] - f
    # Noise changes every feature, by about N(0, 1); the markup is the same page.
    assert (diff != 0).all()
    assert 0.8 < diff.std() < 1.2 and abs(diff.mean()) < 0.1
    np.testing.assert_array_equal(noise['targets'], clean['targets'])


def test_features_encode_the_page():
  """Noise-free features differ between pages with different markup."""
  spec = synthetic.PageSpec(feature_noise=0.0, text_visibility=0.0)
  src = synthetic.SyntheticPages(spec, num_samples=6, seed=9)
  pages = [src[i] for i in range(6)]
  for a in range(6):
    for b in range(a + 1, 6):
      if not np.array_equal(pages[a]['targets'], pages[b]['targets']):
        assert not np.allclose(pages[a]['features'], pages[b]['features'])


def test_element_types_depend_on_section_class():
  """'faq_accordion' sections contain an accordion far more often than sections on average."""
  spec = synthetic.PageSpec(num_semantic_classes=10, max_seq_len=256)
  src = synthetic.SyntheticPages(spec, num_samples=300, seed=2)
  faq, accordion = vocab.SEMANTIC_CLASSES.index('faq_accordion'), vocab.ELEMENT_TYPES.index(
      'accordion')
  with_acc, per_class = np.zeros(spec.num_semantic_classes), np.zeros(spec.num_semantic_classes)
  for i in range(len(src)):
    for cls, elements in parse(page_tokens(src[i])):
      per_class[cls] += 1
      with_acc[cls] += any(e == accordion for e, _ in elements)
  assert per_class[faq] >= 50
  faq_rate = with_acc[faq] / per_class[faq]
  others = np.delete(np.arange(spec.num_semantic_classes), faq)
  other_rate = with_acc[others].sum() / per_class[others].sum()
  assert faq_rate > 0.5 and faq_rate > 4 * other_rate, (faq_rate, other_rate)


def test_page_spec_validation():
  with pytest.raises(ValueError, match='num_semantic_classes'):
    synthetic.PageSpec(num_semantic_classes=51)
  with pytest.raises(ValueError, match='num_element_types'):
    synthetic.PageSpec(num_element_types=31)
  with pytest.raises(ValueError, match='max_seq_len'):
    synthetic.PageSpec(max_seq_len=8)
