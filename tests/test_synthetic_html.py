"""synthetic_html: deterministic pages, the written folder, and section / element types read from
the HTML semantics alone (no browser: the pages are parsed with lxml)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import lxml.html
import pytest

from phase1_jax.data import synthetic_html

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANDMARKS = ('header', 'nav', 'main', 'aside', 'footer', 'form', 'article', 'section')
# Element type -> XPath that finds it by tag, ARIA role or input type.
ELEMENT_XPATHS = {
    'button': '//button[not(@role)]', 'link': '//a[@href]', 'image': '//img[@alt]',
    'input': '//input[@type="text"]', 'checkbox': '//label/input[@type="checkbox"]',
    'radio': '//label/input[@type="radio"]', 'slider': '//input[@type="range"]',
    'search_bar': '//input[@type="search"]', 'table': '//table[tr/th][tr/td]',
    'list': '//ul[li]|//ol[li]', 'heading': '//h1|//h2|//h3', 'paragraph': '//p',
    'textarea': '//textarea', 'select': '//select[option]', 'progress_bar': '//progress',
    'video': '//video', 'modal': '//dialog[@open]', 'tabs': '//*[@role="tablist"][*[@role="tab"]]',
    'dropdown': '//*[@role="menu"][*[@role="menuitem"]]', 'tooltip': '//*[@role="tooltip"]',
    'accordion': '//details[summary]', 'icon': '//svg',
    'breadcrumb': '//nav[@aria-label="Breadcrumb"][a]',
    'carousel': '//section[@aria-roledescription="carousel"][img]'}


def section_types(doc) -> list[str]:
  """The section type of each landmark of a parsed page (nested breadcrumb navs and carousel
  sections are elements; a carousel has no name or heading, so it is no region)."""
  found = []
  for el in doc.iter(*LANDMARKS):
    if el.tag == 'nav' and el.get('aria-label') == 'Breadcrumb':
      continue
    if el.tag == 'section':
      if el.get('aria-roledescription') == 'carousel':
        assert el.get('aria-label') is None and el.find('.//h2') is None
        continue
      assert el.get('aria-label') and el.find('h2').text_content() == el.get('aria-label')
      found.append('region')
    elif el.tag == 'form' and el.get('role') == 'search':
      found.append('search')
    else:
      assert el.get('role') is None, lxml.html.tostring(el)[:80]
      found.append(el.tag)
  return found


def element_types(doc) -> set[str]:
  return {name for name, xpath in ELEMENT_XPATHS.items() if doc.xpath(xpath)}


def test_pages_are_deterministic_in_seed_and_index():
  page = synthetic_html.page_html(3, 0)
  assert page == synthetic_html.page_html(3, 0)
  assert page != synthetic_html.page_html(4, 0)
  assert page != synthetic_html.page_html(3, 1)
  narrow = lxml.html.fromstring(synthetic_html.page_html(3, 0, width=600))
  assert int(re.search(r'--w:(\d+)px', narrow.find('body').get('style')).group(1)) <= 600


def test_pages_hold_landmarks_and_every_type():
  sections, elements = set(), set()
  for i in range(200):
    html = synthetic_html.page_html(i, 0)
    doc = lxml.html.fromstring(html)
    page_sections, page_elements = section_types(doc), element_types(doc)
    assert len(page_sections) >= 2 and len(page_elements) >= 3, (i, page_sections, page_elements)
    assert page_sections.count('main') <= 1
    for el in doc.find('body').iter(*LANDMARKS):
      assert len(el), f'page {i}: empty <{el.tag}>'
    assert '--accent' in doc.find('body').get('style')   # inline styles stay well quoted
    assert doc.find('body').get('style').endswith('px')
    assert not doc.xpath('//@id|//@class'), f'page {i}: ids or classes in the markup'
    sections.update(page_sections)
    elements.update(page_elements)
  assert sections == set(synthetic_html.SECTION_TYPES)
  assert elements == set(synthetic_html.ELEMENT_TYPES)


def test_text_is_short_single_spaced_lexicon_words():
  lexicon = set(synthetic_html.LEXICON)
  for i in range(50):
    doc = lxml.html.fromstring(synthetic_html.page_html(i, 7))
    body = doc.find('body')
    texts = [t for t in body.xpath('.//text()') if t.strip()]
    values = body.xpath('.//@placeholder|.//@alt|.//@aria-label')
    assert all(v == ' '.join(v.split()) for v in values), values
    texts += [v for v in values if v != 'Breadcrumb']
    for text in texts:
      assert '  ' not in text and '\n' not in text.strip(), repr(text)
      words = text.lower().split()
      assert 1 <= len(words) <= 4 and set(words) <= lexicon, (i, text)


def test_write_pages_folder(tmp_path):
  out = tmp_path / 'pages'
  paths = synthetic_html.write_pages(str(out), 5, seed=1)
  on_disk = {os.path.relpath(os.path.join(root, f), out)
             for root, _, files in os.walk(out) for f in files}
  assert on_disk == set(paths)
  assert {f'page-{i:05d}.html' for i in range(5)} | {'style.css'} <= on_disk
  pngs = [p for p in paths if p.startswith('img/') and p.endswith('.png')]
  assert len(pngs) >= 6
  for p in pngs:
    data = (out / p).read_bytes()
    assert data.startswith(b'\x89PNG\r\n\x1a\n') and data[12:16] == b'IHDR'
  for i in range(5):
    html = (out / f'page-{i:05d}.html').read_text()
    assert html == synthetic_html.page_html(i, 1)
    doc = lxml.html.fromstring(html)
    for ref in doc.xpath('//img/@src|//video/@poster|//link/@href'):
      assert (out / ref).is_file(), ref
  for rel in paths:
    text = (out / rel).read_bytes().decode('latin-1').lower()
    for bad in ('http:', 'https:', 'file:', '<script', 'javascript:', '@import', 'animation'):
      assert bad not in text, (rel, bad)


def test_write_pages_refuses_a_used_folder(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert len(synthetic_html.write_pages(str(empty), 1)) > 1
  with pytest.raises(synthetic_html.SyntheticHtmlError, match='not an empty directory') as e:
    synthetic_html.write_pages(str(empty), 1)
  assert '\n' not in str(e.value)
  (tmp_path / 'a_file').write_text('x')
  with pytest.raises(synthetic_html.SyntheticHtmlError, match='not an empty directory'):
    synthetic_html.write_pages(str(tmp_path / 'a_file'), 1)
  with pytest.raises(synthetic_html.SyntheticHtmlError, match='num_pages'):
    synthetic_html.write_pages(str(tmp_path / 'new'), 0)


def test_cli(tmp_path):
  cmd = [sys.executable, '-m', 'phase1_jax.data.synthetic_html', '--out', str(tmp_path / 'p'),
         '--num_pages', '3', '--seed', '2']
  ok = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
  assert ok.returncode == 0, ok.stderr
  assert (tmp_path / 'p' / 'page-00002.html').read_text() == synthetic_html.page_html(2, 2)
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
  assert again.returncode != 0
  assert again.stderr.strip().splitlines() == [
      f'synthetic_html: --out {tmp_path / "p"}: exists and is not an empty directory']


def test_chrome_text_is_conventional_and_in_order():
  """Nav and footer links, header/form/search buttons and form fields take the conventional words
  of CHROME_TEXT in its order; content text does not."""
  seen = 0
  for i in range(60):
    doc = lxml.html.fromstring(synthetic_html.page_html(i, 3))
    for (kind, element), choices in synthetic_html.CHROME_TEXT.items():
      tag = {'search': 'form[@role="search"]'}.get(kind, kind)
      path = {'link': 'a', 'button': 'button', 'input': 'input[@type="text"]'}[element]
      for sec in doc.xpath(f'//body/{tag}|//body/div/{tag}'):
        if kind == 'form' and sec.get('role'):
          continue
        texts = [(el.get('placeholder') if element == 'input' else el.text_content()).lower()
                 for el in sec.xpath(f'./{path}')]
        ranks = [choices.index(t) for t in texts if t in choices]
        assert ranks == sorted(set(ranks)), (i, kind, element, texts)
        seen += len(ranks)
  assert seen > 200
