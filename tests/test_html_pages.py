"""phase1_jax.data.html_pages: HTML -> normalised markup, section classes and element types
(class-keyword mapping, nesting, normalisation, broken, empty and binary pages)."""
from __future__ import annotations

import numpy as np
import pytest

from phase1_jax.data import bpe, html_labels, html_pages, vocab

KEYWORDS = html_labels.LabelScheme(class_keywords=True)


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


@pytest.mark.parametrize('data,binary', [
    (bytes(np.random.default_rng(0).integers(1, 256, 5000, dtype=np.uint8)), True),   # no NUL
    (b'<p>a\x00b</p>', True), ('<p>' + '\ufffd' * 50 + '</p>', True),    # a DOM of junk bytes
    ('<p>caf\xe9</p>'.encode('latin-1'), False), ('<p>\x0ctab\there</p>'.encode(), False),
    ('<p>x</p>'.encode('utf-16'), False), ('<p>\u4e2d\u6587</p>', False)])
def test_binary_content_is_told_from_text_in_any_encoding(data, binary):
  assert (html_pages.binary_reason(data) is not None) == binary
