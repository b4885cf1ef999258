"""HTML -> labels under the semantic scheme (tags, ARIA roles, input types, landmarks), the
whitespace that separates words, and a rendered DOM's visibility and captured height."""
from __future__ import annotations

import numpy as np
import pytest

from phase1_jax.data import html_labels, html_pages

SCHEME = html_pages.SEMANTIC
TYPES, CLASSES = SCHEME.element_types, SCHEME.semantic_classes

ELEMENTS = [
    ('<div role="button">Go</div>', 'button'), ('<button>Go</button>', 'button'),
    ('<input type="submit">', 'button'), ('<a href="/x">x</a>', 'link'),
    ('<img src="a.png">', 'image'), ('<input type="email">', 'input'),
    ('<input type="checkbox">', 'checkbox'), ('<input type="radio">', 'radio'),
    ('<input type="range">', 'slider'), ('<input type="search">', 'search_bar'),
    ('<div aria-roledescription="carousel">x</div>', 'carousel'),
    ('<details><summary>q</summary>a</details>', 'accordion'), ('<video></video>', 'video'),
    ('<table><tr><td>c</td></tr></table>', 'table'), ('<ol><li>a</li></ol>', 'list'),
    ('<article>x</article>', 'card'), ('<div role="dialog">x</div>', 'modal'),
    ('<ul role="tablist"></ul>', 'tabs'), ('<ul role="menu"><li>a</li></ul>', 'dropdown'),
    ('<svg><path d="M0"/></svg>', 'icon'), ('<h4>t</h4>', 'heading'),
    ('<div role="heading">t</div>', 'heading'), ('<p>t</p>', 'paragraph'),
    ('<textarea></textarea>', 'textarea'), ('<select><option>a</option></select>', 'select'),
    ('<progress></progress>', 'progress_bar'), ('<div role="progressbar"></div>', 'progress_bar'),
    ('<span role="tooltip">t</span>', 'tooltip'),
]


@pytest.mark.parametrize('html,expected', ELEMENTS, ids=[e for _, e in ELEMENTS])
def test_element_types_from_tags_roles_and_input_types(html, expected):
  page = html_pages.parse_page(f'<body>{html}</body>'.encode())
  assert [TYPES[e] for e in page.element_types] == [expected]


@pytest.mark.parametrize('html', [
    '<div class="product-card">x</div>', '<div class="swiper-container">x</div>',
    '<span class="badge">new</span>', '<div id="map">m</div>', '<div class="modal">x</div>',
    '<iframe src="https://maps.example/x"></iframe>'])
def test_class_names_and_ids_are_not_read(html):
  assert html_pages.parse_page(f'<body>{html}</body>'.encode()).element_types == []


LANDMARKS = [
    ('<header>x</header>', 'header'), ('<div role="banner">x</div>', 'header'),
    ('<nav><a>a</a></nav>', 'nav'), ('<div role="navigation">x</div>', 'nav'),
    ('<main>x</main>', 'main'), ('<aside>x</aside>', 'aside'),
    ('<div role="complementary">x</div>', 'aside'), ('<footer>x</footer>', 'footer'),
    ('<div role="contentinfo">x</div>', 'footer'), ('<form><input></form>', 'form'),
    ('<search><input></search>', 'search'), ('<form role="search"><input></form>', 'search'),
    ('<article>x</article>', 'article'), ('<section><h2>T</h2>x</section>', 'region'),
    ('<section aria-label="Intro">x</section>', 'region'),
    ('<div role="region" aria-label="r"><h3>T</h3></div>', 'region'),
    # Ids and classes that named sections wrongly on real pages: the landmark decides.
    ('<section id="method.map"><h3>map</h3></section>', 'region'),
    ('<section id="associatedtype.Error"><h3>Error</h3></section>', 'region'),
    ('<nav class="pricing">x</nav>', 'nav'),
]


@pytest.mark.parametrize('html,expected', LANDMARKS, ids=[e for _, e in LANDMARKS])
def test_sections_from_landmarks(html, expected):
  page = html_pages.parse_page(f'<body>{html}<p>after</p></body>'.encode())
  end = page.markup.index('<p >after')
  np.testing.assert_array_equal(page.char_classes_N[:end], CLASSES.index(expected))
  assert (page.char_classes_N[end:] == -1).all()


def test_a_section_without_heading_or_name_is_not_a_landmark():
  page = html_pages.parse_page(b'<body><section><p>x</p></section></body>')
  assert (page.char_classes_N == -1).all()


def test_schemes_declare_their_lists():
  keywords = html_labels.LabelScheme(class_keywords=True)
  assert len(keywords.semantic_classes) == 50 and len(keywords.element_types) == 30
  assert CLASSES == html_labels.LANDMARK_CLASSES and len(CLASSES) == 9
  # Every type of the semantic scheme is reachable from the ELEMENTS table, and only those.
  assert set(TYPES) == {e for _, e in ELEMENTS}


@pytest.mark.parametrize('html,markup', [
    (b'<p>Redirecting to <a href="x">here</a>.</p>', '<p >Redirecting to <a >here</a>.</p>'),
    (b'<p>Usage in <code>const</code> and <b>more</b></p>',
     '<p >Usage in <code >const</code> and <b >more</b></p>'),
    (b'<div>\n  <p>\n one \n</p>\n  <p>two</p>\n</div>', '<div ><p >one</p><p >two</p></div>'),
    (b'<ul>\n<li> a </li>\n<li>b</li></ul> tail', '<ul ><li >a</li><li >b</li></ul>tail'),
    (b'<p><span>a</span> <span>b</span></p>', '<p ><span >a</span> <span >b</span></p>'),
])
def test_whitespace_between_words_is_kept(html, markup):
  assert html_pages.parse_page(b'<body>' + html + b'</body>').markup == markup


def test_redirect_stub_is_a_page_error():
  with pytest.raises(html_pages.PageError, match='redirect stub'):
    html_pages.parse_page(b'<html><head><meta http-equiv="Refresh" content="0; URL=b.html">'
                          b'</head><body>Moved</body></html>')


def box(y, h=20):
  return f'data-p1-box="0 {y} 100 {h}"'


def test_rendered_dom_keeps_what_the_screenshot_shows():
  dom = (f'<body><main {box(0, 3000)}><h1 {box(0)}>Top</h1><p>hidden</p>'
         f'<nav {box(40)}><a {box(40)}>a</a><a>invisible</a></nav> shown'
         f'<p {box(1990)}>at the edge</p><p {box(2000)}>below</p> after <img {box(10)}>'
         '</main></body>')
  page = html_pages.parse_page(dom.encode(), rendered=True, max_height=2000)
  assert page.markup == ('<main ><h2 >Top</h2><nav ><a >a</a></nav>shown<p >at the edge</p>'
                         '</main>')
  assert [TYPES[e] for e in page.element_types] == ['link', 'heading', 'paragraph']
  assert page.char_classes_N[page.markup.index('<a ')] == CLASSES.index('nav')
  with pytest.raises(html_pages.PageError, match='no visible content'):
    html_pages.parse_page(b'<body><p>x</p></body>', rendered=True, max_height=100)


def test_huge_page_is_cut_at_max_chars():
  page = html_pages.parse_page(b'<body>' + b'<p>word word</p>' * 100_000 + b'</body>',
                               max_chars=1000)
  assert page.truncated and 1000 <= len(page.markup) < 1100
  assert len(page.char_classes_N) == len(page.markup)
