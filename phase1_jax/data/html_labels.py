"""Labels of an HTML element: its element type and, for a landmark, its section class.

Two schemes (docs/dataset.md, "Labels: the semantic scheme" and "Labels: class keywords", has
the tables):
  semantic (default): what HTML itself says. Element types from the tag, the ARIA role and the
    input type; sections from landmarks: header/banner, nav/navigation, main, aside/complementary,
    footer/contentinfo, form, search, article, and a section/region that has a heading or an
    accessible name. Class names and ids are never read.
  class keywords (`prepare --class_keywords`): the component-naming rules for corpora that name
    their components (`product-card`, `<section class="pricing">`): element types also from
    class names, 50 section classes from keywords in a landmark's class / id / aria-label.
A dataset stores its scheme's class and type lists in dataset.json; the model's heads follow them.
"""
from __future__ import annotations

import dataclasses
import re

from phase1_jax.data import vocab

TYPE = {name: i for i, name in enumerate(vocab.ELEMENT_TYPES)}

ROLE_TYPES = {
    'button': 'button', 'link': 'link', 'img': 'image', 'textbox': 'input', 'table': 'table',
    'grid': 'table', 'list': 'list', 'dialog': 'modal', 'alertdialog': 'modal', 'tablist': 'tabs',
    'menu': 'dropdown', 'checkbox': 'checkbox', 'switch': 'checkbox', 'radio': 'radio',
    'radiogroup': 'radio', 'slider': 'slider', 'searchbox': 'search_bar', 'heading': 'heading',
    'listbox': 'select', 'combobox': 'select', 'progressbar': 'progress_bar', 'meter':
    'progress_bar', 'tooltip': 'tooltip'}
INPUT_TYPES = {'checkbox': 'checkbox', 'radio': 'radio', 'range': 'slider', 'search': 'search_bar',
               'button': 'button', 'submit': 'button', 'reset': 'button', 'image': 'button'}
NATIVE_TAG_TYPES = {
    'button': 'button', 'a': 'link', 'img': 'image', 'picture': 'image', 'input': 'input',
    'video': 'video', 'table': 'table', 'ul': 'list', 'ol': 'list', 'dl': 'list', 'menu': 'list',
    'article': 'card', 'dialog': 'modal', 'details': 'accordion', 'p': 'paragraph',
    'textarea': 'textarea', 'select': 'select', 'datalist': 'select', 'progress': 'progress_bar',
    'meter': 'progress_bar', 'svg': 'icon', 'i': 'icon',
    **{f'h{k}': 'heading' for k in range(1, 7)}}
# The canonical tags (vocab.ELEMENT_TAGS, custom `ui-*` elements included) read back as their
# types under the class-keyword scheme, so the synthetic pages' own markup converts unchanged.
KEYWORD_TAG_TYPES = {**NATIVE_TAG_TYPES,
                     **{tag: vocab.ELEMENT_TYPES[e] for e, tag in enumerate(vocab.ELEMENT_TAGS)}}
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

# The semantic scheme's section classes: landmarks, by tag and by ARIA role.
LANDMARK_CLASSES = ('header', 'nav', 'main', 'aside', 'footer', 'form', 'search', 'article',
                    'region')
LANDMARK_TAGS = {'header': 'header', 'nav': 'nav', 'main': 'main', 'aside': 'aside',
                 'footer': 'footer', 'form': 'form', 'search': 'search', 'article': 'article',
                 'section': 'region'}
LANDMARK_ROLES = {'banner': 'header', 'navigation': 'nav', 'main': 'main',
                  'complementary': 'aside', 'contentinfo': 'footer', 'form': 'form',
                  'search': 'search', 'article': 'article', 'region': 'region'}
# Words in a section's class / id / aria-label, by priority (first match wins): class keywords.
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
KEYWORD_LANDMARK_TAGS = {'header', 'nav', 'main', 'aside', 'footer', 'section', 'form'}
KEYWORD_LANDMARK_ROLES = {'banner': 'header', 'navigation': 'nav', 'main': 'main',
                          'complementary': 'aside', 'contentinfo': 'footer', 'region': 'section',
                          'form': 'form', 'search': 'form'}
HEADING = './/*[self::h1 or self::h2 or self::h3 or self::h4 or self::h5 or self::h6 or ' \
          '@role="heading"]'


def _role(el) -> str:
  return (el.get('role') or '').strip().lower().split(' ')[0]


def _words(value: str) -> list[str]:
  return re.findall(r'[a-z0-9]+', value.lower())


def _class_names(el) -> list[str]:
  names = (el.get('class') or '').lower().split() + [(el.get('id') or '').lower()]
  out = []
  for name in filter(None, names):
    base = re.split(r'__|--', name)[0]
    out += [name, base, re.split(r'[-_]', base)[-1]]
  return out


@dataclasses.dataclass(frozen=True)
class LabelScheme:
  """How elements and sections are labelled; its lists are what a dataset declares."""
  class_keywords: bool = False

  @property
  def semantic_classes(self) -> tuple[str, ...]:
    return vocab.SEMANTIC_CLASSES if self.class_keywords else LANDMARK_CLASSES

  @property
  def element_types(self) -> tuple[str, ...]:
    """The types this scheme can assign, in vocab.ELEMENT_TYPES order."""
    if self.class_keywords:
      return vocab.ELEMENT_TYPES
    reachable = {*ROLE_TYPES.values(), *INPUT_TYPES.values(), *NATIVE_TAG_TYPES.values(),
                 'input', 'carousel'}
    return tuple(t for t in vocab.ELEMENT_TYPES if t in reachable)

  def element_type(self, el, tag: str) -> str | None:
    """The element type name of an element (None: not one of the scheme's types)."""
    role = _role(el)
    if role in ROLE_TYPES:
      return ROLE_TYPES[role]
    if (el.get('aria-roledescription') or '').lower() == 'carousel':
      return 'carousel'
    if self.class_keywords:
      for name in _class_names(el):
        if name in CLASS_TYPES:
          return CLASS_TYPES[name]
    if tag == 'input':
      return INPUT_TYPES.get((el.get('type') or 'text').lower(), 'input')
    if self.class_keywords and tag == 'iframe':
      src = (el.get('src') or '').lower()
      if re.search(r'youtube|vimeo|player|video', src):
        return 'video'
      return 'map' if 'map' in src else None
    return (KEYWORD_TAG_TYPES if self.class_keywords else NATIVE_TAG_TYPES).get(tag)

  def section_class(self, el, tag: str) -> str | None:
    """The section class name of a landmark element (None: not a landmark)."""
    if self.class_keywords:
      return _keyword_section_class(el, tag)
    role = _role(el)
    name = LANDMARK_ROLES.get(role) or LANDMARK_TAGS.get(tag)
    if name == 'region' and not (el.get('aria-label') or el.get('aria-labelledby')
                                 or el.xpath(HEADING)):
      return None   # a <section> without a heading or a name is not a landmark
    return name


def _keyword_section_class(el, tag: str) -> str | None:
  role = _role(el)
  kind = KEYWORD_LANDMARK_ROLES.get(role) or (tag if tag in KEYWORD_LANDMARK_TAGS else None)
  if kind is None:
    return None
  words = [w for v in (el.get('class'), el.get('id'), el.get('aria-label')) if v
           for w in _words(v)]
  hits = [SECTION_KEYWORDS[w] for w in words if w in SECTION_KEYWORDS]
  if hits:
    return min(hits, key=list(SECTION_KEYWORDS.values()).index)
  has = lambda path: bool(el.xpath(path))
  if kind in ('nav', 'footer', 'aside'):
    return {'nav': 'navbar', 'footer': 'footer', 'aside': 'sidebar_menu'}[kind]
  if kind == 'header':
    return 'navbar' if has('.//nav') or len(el.xpath('.//a')) >= 3 else (
        'hero' if has('.//h1') else 'navbar')
  if kind == 'form' or (has('.//input') and not has('.//section')):
    if role == 'search' or has('.//input[@type="search"]'):
      return 'search_header'
    if has('.//input[@type="password"]'):
      return 'signup_form' if len(el.xpath('.//input[@type="password"]')) > 1 else 'login_form'
    if has('.//textarea'):
      return 'contact_form'
    if len(el.xpath('.//input[not(@type="submit" or @type="button" or @type="hidden")]')) == 1:
      return 'newsletter'
    return 'contact_form'
  for path, name in (('.//video', 'video_player'), ('.//table', 'data_table')):
    if has(path):
      return name
  if len(el.xpath('.//img')) >= 3:
    return 'image_gallery'
  return 'hero' if has('.//h1') else 'feature_list'
