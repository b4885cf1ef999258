"""One HTML page -> normalised markup, per-character section classes, element types and layout.

The mapping onto the 30 element types and 50 section classes of vocab.py (README, "Your own
pages", has the tables):
  element type: ARIA role, else a component class name (carousel, accordion, gallery, ...), else
    the input type, else the tag. A recognised element is written with its type's canonical tag
    (vocab.ELEMENT_TAGS, as on the synthetic pages), so each type's open tag is one BPE token
    that the consistency loss reads.
  section: a landmark (header nav main aside footer section form, or an ARIA landmark role); its
    class from keywords in its class / id / aria-label, else from its tag, role and content.
    Every character inside a section carries the innermost section's class, -1 outside.

Normalised markup: the <body> only; script, style, template, head-like tags, comments, hidden
inputs and svg contents dropped; open tags written `<tag` + attributes + `>`, always with a space
after the tag name (`<p >`), so an open-tag token never prefixes another tag (`<a ` vs `<abbr `);
only the KEPT_ATTRIBUTES (values truncated); whitespace collapsed, text nodes stripped.
"""
from __future__ import annotations

import dataclasses
import re
import zlib

import lxml.etree
import lxml.html
import numpy as np

from phase1_jax.data import vocab

TYPE = {name: i for i, name in enumerate(vocab.ELEMENT_TYPES)}
CLASS = {name: i for i, name in enumerate(vocab.SEMANTIC_CLASSES)}
KEPT_ATTRIBUTES = ('id', 'class', 'role', 'type', 'name', 'value', 'placeholder', 'alt',
                   'aria-label')
TAG_NAME = re.compile(r'[a-z][a-z0-9:-]*')
MAX_ATTRIBUTE_CHARS = 80
MAX_LAYOUT_WORDS = 4
DROPPED = {'script', 'style', 'noscript', 'template', 'head', 'title', 'meta', 'link', 'base',
           'br', 'wbr', 'object', 'embed', 'param', 'source', 'track'}
VOID = {'img', 'input', 'hr', 'area', 'col'}

ROLE_TYPES = {
    'button': 'button', 'link': 'link', 'img': 'image', 'textbox': 'input', 'table': 'table',
    'grid': 'table', 'list': 'list', 'dialog': 'modal', 'alertdialog': 'modal', 'tablist': 'tabs',
    'menu': 'dropdown', 'checkbox': 'checkbox', 'switch': 'checkbox', 'radio': 'radio',
    'radiogroup': 'radio', 'slider': 'slider', 'searchbox': 'search_bar', 'heading': 'heading',
    'listbox': 'select', 'combobox': 'select', 'progressbar': 'progress_bar', 'meter':
    'progress_bar', 'tooltip': 'tooltip'}
# Component class names: a class (or id) matches when it, or its last '-'/'_' part once BEM
# suffixes (`__x`, `--x`) are cut, is one of these words: `product-card` is a card, `card-title`
# is not.
CLASS_TYPES = {
    'carousel': 'carousel', 'slider': 'carousel', 'swiper': 'carousel', 'slick': 'carousel',
    'slideshow': 'carousel', 'splide': 'carousel', 'glide': 'carousel',
    'accordion': 'accordion', 'collapsible': 'accordion', 'expander': 'accordion',
    'gallery': 'gallery', 'lightbox': 'gallery', 'masonry': 'gallery',
    'modal': 'modal', 'popup': 'modal', 'dialog': 'modal', 'tabs': 'tabs', 'tabset': 'tabs',
    'dropdown': 'dropdown', 'breadcrumb': 'breadcrumb', 'breadcrumbs': 'breadcrumb',
    'pagination': 'pagination', 'pager': 'pagination', 'badge': 'badge', 'chip': 'badge',
    'pill': 'badge', 'avatar': 'avatar', 'icon': 'icon', 'fa': 'icon', 'fas': 'icon',
    'material-icons': 'icon', 'card': 'card', 'tile': 'card', 'tooltip': 'tooltip',
    'popover': 'tooltip', 'map': 'map', 'progress': 'progress_bar', 'progressbar': 'progress_bar',
    'searchbar': 'search_bar', 'search-bar': 'search_bar', 'searchbox': 'search_bar'}
INPUT_TYPES = {'checkbox': 'checkbox', 'radio': 'radio', 'range': 'slider', 'search': 'search_bar',
               'button': 'button', 'submit': 'button', 'reset': 'button', 'image': 'button'}
TAG_TYPES = {
    'button': 'button', 'a': 'link', 'img': 'image', 'picture': 'image', 'input': 'input',
    'video': 'video', 'table': 'table', 'ul': 'list', 'ol': 'list', 'dl': 'list', 'menu': 'list',
    'article': 'card', 'dialog': 'modal', 'details': 'accordion', 'p': 'paragraph',
    'textarea': 'textarea', 'select': 'select', 'datalist': 'select', 'progress': 'progress_bar',
    'meter': 'progress_bar', 'svg': 'icon', 'i': 'icon',
    **{f'h{k}': 'heading' for k in range(1, 7)},
    **{tag: vocab.ELEMENT_TYPES[e] for e, tag in enumerate(vocab.ELEMENT_TAGS)}}

LANDMARK_TAGS = {'header', 'nav', 'main', 'aside', 'footer', 'section', 'form'}
LANDMARK_ROLES = {'banner': 'header', 'navigation': 'nav', 'main': 'main',
                  'complementary': 'aside', 'contentinfo': 'footer', 'region': 'section',
                  'form': 'form', 'search': 'form'}
# Words in a section's class / id / aria-label, by priority (first match wins).
SECTION_KEYWORDS = {
    'breadcrumb': 'breadcrumb_bar', 'breadcrumbs': 'breadcrumb_bar', 'cookie': 'cookie_banner',
    'consent': 'cookie_banner', 'pricing': 'pricing_table', 'plans': 'pricing_table',
    'faq': 'faq_accordion', 'gallery': 'image_gallery', 'login': 'login_form',
    'signin': 'login_form', 'signup': 'signup_form', 'register': 'signup_form',
    'contact': 'contact_form', 'checkout': 'checkout_form', 'payment': 'checkout_form',
    'cart': 'cart_summary', 'basket': 'cart_summary', 'newsletter': 'newsletter',
    'subscribe': 'newsletter', 'search': 'search_header', 'pdp': 'product_detail',
    'products': 'product_grid', 'product': 'product_grid', 'shop': 'product_grid',
    'testimonial': 'testimonials', 'testimonials': 'testimonials', 'team': 'team_grid',
    'features': 'feature_list', 'feature': 'feature_list', 'blog': 'blog_list',
    'posts': 'blog_list', 'news': 'blog_list', 'post': 'blog_post', 'article': 'blog_post',
    'comments': 'comment_thread', 'comment': 'comment_thread', 'video': 'video_player',
    'stats': 'stats_counter', 'counter': 'stats_counter', 'dashboard': 'dashboard_stats',
    'datatable': 'data_table', 'settings': 'settings_panel', 'preferences': 'settings_panel',
    'profile': 'profile_card', 'author': 'profile_card', 'notifications': 'notification_list',
    'calendar': 'calendar', 'map': 'map_locator', 'locations': 'map_locator',
    'events': 'event_list', 'event': 'event_list', 'jobs': 'job_board', 'careers': 'job_board',
    'courses': 'course_catalog', 'course': 'course_catalog', 'recipe': 'recipe_card',
    'weather': 'weather_widget', 'chat': 'chat_window', 'files': 'file_browser',
    'music': 'music_player', 'playlist': 'music_player', 'portfolio': 'portfolio_showcase',
    'projects': 'portfolio_showcase', 'partners': 'partner_logos', 'clients': 'partner_logos',
    'logos': 'partner_logos', 'sponsors': 'partner_logos', 'timeline': 'timeline',
    'cta': 'cta_banner', 'error': 'error_page', '404': 'error_page',
    'onboarding': 'onboarding_steps', 'steps': 'onboarding_steps', 'reviews': 'review_summary',
    'review': 'review_summary', 'ratings': 'review_summary', 'filter': 'filter_panel',
    'filters': 'filter_panel', 'facets': 'filter_panel', 'carousel': 'media_carousel',
    'slider': 'media_carousel', 'slideshow': 'media_carousel', 'hero': 'hero',
    'jumbotron': 'hero', 'masthead': 'hero', 'sidebar': 'sidebar_menu', 'navbar': 'navbar',
    'menu': 'navbar', 'nav': 'navbar', 'footer': 'footer'}
WORD_INDEX = {w: i for i, w in reversed(list(enumerate(vocab.WORDS)))}


class PageError(ValueError):
  """The page cannot be converted (the message says why)."""


@dataclasses.dataclass
class ParsedPage:
  """markup: normalised markup. char_classes_N: int8 section class of each character (-1: outside
  every section). element_types: sorted type ids on the page. layout: the page as the feature
  renderer reads it, [(class or None, [(type, [word indices])])] in reading order."""
  markup: str
  char_classes_N: np.ndarray
  element_types: list[int]
  layout: list


def _words(value: str) -> list[str]:
  return re.findall(r'[a-z0-9]+', value.lower())


def _class_names(el) -> list[str]:
  names = (el.get('class') or '').lower().split() + [(el.get('id') or '').lower()]
  out = []
  for name in filter(None, names):
    base = re.split(r'__|--', name)[0]
    out += [name, base, re.split(r'[-_]', base)[-1]]
  return out


def element_type(el, tag: str) -> int | None:
  """The element type of an element (None: not one of the 30), by the module's priority."""
  role = (el.get('role') or '').strip().lower().split(' ')[0]
  if role in ROLE_TYPES:
    return TYPE[ROLE_TYPES[role]]
  if (el.get('aria-roledescription') or '').lower() == 'carousel':
    return TYPE['carousel']
  for name in _class_names(el):
    if name in CLASS_TYPES:
      return TYPE[CLASS_TYPES[name]]
  if tag == 'input':
    return TYPE[INPUT_TYPES.get((el.get('type') or 'text').lower(), 'input')]
  if tag == 'iframe':
    src = (el.get('src') or '').lower()
    if re.search(r'youtube|vimeo|player|video', src):
      return TYPE['video']
    return TYPE['map'] if 'map' in src else None
  return TYPE[TAG_TYPES[tag]] if tag in TAG_TYPES else None


def section_class(el, tag: str) -> int | None:
  """The semantic class of a landmark element (None: not a landmark)."""
  role = (el.get('role') or '').strip().lower().split(' ')[0]
  kind = LANDMARK_ROLES.get(role) or (tag if tag in LANDMARK_TAGS else None)
  if kind is None:
    return None
  words = [w for v in (el.get('class'), el.get('id'), el.get('aria-label')) if v
           for w in _words(v)]
  hits = [SECTION_KEYWORDS[w] for w in words if w in SECTION_KEYWORDS]
  if hits:
    return CLASS[min(hits, key=list(SECTION_KEYWORDS.values()).index)]
  has = lambda path: bool(el.xpath(path))
  if kind == 'nav':
    name = 'navbar'
  elif kind == 'footer':
    name = 'footer'
  elif kind == 'aside':
    name = 'sidebar_menu'
  elif kind == 'header':
    name = 'navbar' if has('.//nav') or len(el.xpath('.//a')) >= 3 else (
        'hero' if has('.//h1') else 'navbar')
  elif kind == 'form' or (has('.//input') and not has('.//section')):
    if role == 'search' or has('.//input[@type="search"]'):
      name = 'search_header'
    elif has('.//input[@type="password"]'):
      name = 'signup_form' if len(el.xpath('.//input[@type="password"]')) > 1 else 'login_form'
    elif has('.//textarea'):
      name = 'contact_form'
    elif len(el.xpath('.//input[not(@type="submit" or @type="button" or @type="hidden")]')) == 1:
      name = 'newsletter'
    else:
      name = 'contact_form'
  elif has('.//video'):
    name = 'video_player'
  elif has('.//table'):
    name = 'data_table'
  elif len(el.xpath('.//img')) >= 3:
    name = 'image_gallery'
  elif has('.//h1'):
    name = 'hero'
  else:
    name = 'feature_list'
  return CLASS[name]


def _escape(text: str, quote: bool = False) -> str:
  text = text.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')
  return text.replace('"', '&quot;') if quote else text


def _text(text: str | None) -> str:
  return _escape(' '.join(text.split())) if text else ''


class _Writer:
  """Accumulates markup pieces with their section class, and the layout."""

  def __init__(self):
    self.pieces, self.classes, self.types, self.layout = [], [], set(), []
    self.sections = []    # the open sections' classes, innermost last

  def put(self, piece: str):
    if piece:
      self.pieces.append(piece)
      self.classes.append(self.sections[-1] if self.sections else -1)

  def element(self, etype: int, text: str | None):
    self.types.add(etype)
    cls = self.sections[-1] if self.sections else None
    if not self.layout or self.layout[-1][0] != cls or self.layout[-1][2] != len(self.sections):
      self.layout.append((cls, [], len(self.sections)))
    words = [WORD_INDEX.get(w, zlib.crc32(w.encode()) % len(vocab.WORDS))
             for w in _words(text or '')[:MAX_LAYOUT_WORDS]]
    self.layout[-1][1].append((etype, words))


def _walk(el, out: _Writer):
  tag = el.tag.lower() if isinstance(el.tag, str) else None
  if tag is None or tag in DROPPED or (tag == 'input' and (el.get('type') or '').lower()
                                        == 'hidden'):
    out.put(_text(el.tail))
    return
  if not TAG_NAME.fullmatch(tag):   # lxml's repair of broken markup can make names like 'div<<p'
    out.put(_text(el.text))
    for child in el:
      _walk(child, out)
    out.put(_text(el.tail))
    return
  etype = element_type(el, tag)
  cls = section_class(el, tag)
  name = vocab.ELEMENT_TAGS[etype] if etype is not None else tag
  if cls is not None:
    out.sections.append(cls)
  attrs = ''.join(f' {a}="{_escape(" ".join(el.get(a).split())[:MAX_ATTRIBUTE_CHARS], True)}"'
                  for a in KEPT_ATTRIBUTES if el.get(a))
  out.put(f'<{name}{attrs or " "}>')
  if etype is not None:
    out.element(etype, el.text)
  if tag not in VOID and tag != 'svg':
    out.put(_text(el.text))
    for child in el:
      _walk(child, out)
    out.put(f'</{name}>')
  if cls is not None:
    out.sections.pop()
  out.put(_text(el.tail))


def parse_page(data: bytes) -> ParsedPage:
  """Parses one page (broken markup is repaired by lxml). Raises PageError when nothing is left."""
  if not data.strip():
    raise PageError('empty file')
  parser = lxml.html.HTMLParser(remove_comments=True, remove_pis=True, recover=True)
  try:
    root = lxml.html.document_fromstring(data, parser=parser)
  except (lxml.etree.ParserError, ValueError) as e:
    raise PageError(f'unparseable HTML ({e})') from None
  body = root.find('body')
  out = _Writer()
  if body is not None:
    out.put(_text(body.text))
  for child in (body if body is not None else root):
    _walk(child, out)
  if not out.pieces:
    raise PageError('no content in <body>')
  lengths = [len(p) for p in out.pieces]
  char_classes = np.repeat(np.array(out.classes, np.int8), lengths)
  layout = [(cls, elements) for cls, elements, _ in out.layout]
  return ParsedPage(''.join(out.pieces), char_classes, sorted(out.types), layout)
