"""The fixed vocabulary of the synthetic UI pages: special tokens, markup, class names, text.

Token ids (the layout docs/dataset.md documents, "The embedded synthetic dataset"):
  0 <pad>, 1 <bos>, 2 <eos>, 3 <unk>, then markup punctuation, section tags (open/close),
  one class-name token per semantic class, one open and one close tag per element type,
  and a lexicon of text words. Ids from `len(TOKENS)` up to `vocab_size` are unused.
"""
from __future__ import annotations

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

SEMANTIC_CLASSES = (
    'navbar', 'hero', 'pricing_table', 'faq_accordion', 'image_gallery', 'login_form', 'footer',
    'signup_form', 'contact_form', 'search_header', 'product_grid', 'product_detail',
    'cart_summary',
    'checkout_form', 'testimonials', 'team_grid', 'feature_list', 'blog_list', 'blog_post',
    'comment_thread', 'video_player', 'newsletter', 'cookie_banner', 'breadcrumb_bar',
    'sidebar_menu',
    'dashboard_stats', 'data_table', 'settings_panel', 'profile_card', 'notification_list',
    'calendar', 'map_locator', 'event_list', 'job_board', 'course_catalog', 'recipe_card',
    'weather_widget', 'chat_window', 'file_browser', 'music_player', 'portfolio_showcase',
    'partner_logos', 'stats_counter', 'timeline', 'cta_banner', 'error_page', 'onboarding_steps',
    'review_summary', 'filter_panel', 'media_carousel',
)

ELEMENT_TYPES = (
    'button', 'link', 'image', 'input', 'carousel', 'accordion', 'gallery', 'video', 'table',
    'list',
    'card', 'modal', 'tabs', 'dropdown', 'checkbox', 'radio', 'slider', 'search_bar', 'breadcrumb',
    'pagination', 'badge', 'avatar', 'icon', 'heading', 'paragraph', 'textarea', 'select',
    'progress_bar', 'tooltip', 'map',
)

# The HTML tag each element type is written with (custom elements where HTML has none).
ELEMENT_TAGS = (
    'button', 'a', 'img', 'input', 'ui-carousel', 'ui-accordion', 'ui-gallery', 'video', 'table',
    'ul', 'article', 'dialog', 'ui-tabs', 'ui-dropdown', 'ui-checkbox', 'ui-radio', 'ui-slider',
    'ui-search', 'ui-breadcrumb', 'ui-pagination', 'ui-badge', 'ui-avatar', 'i', 'h2', 'p',
    'textarea', 'select', 'progress', 'ui-tooltip', 'ui-map',
)

SECTION_TAGS = ('nav', 'header', 'section', 'form', 'footer', 'aside', 'main')

# Element types each named class is known for (the generator favours them); other classes get
# signature types drawn once from the world seed.
SIGNATURE_ELEMENTS = {
    'navbar': ('link', 'button', 'icon'), 'hero': ('heading', 'paragraph', 'button'),
    'pricing_table': ('table', 'button', 'badge'), 'faq_accordion': ('accordion', 'heading'),
    'image_gallery': ('gallery', 'image'), 'login_form': ('input', 'button', 'checkbox'),
    'footer': ('link', 'icon', 'paragraph'), 'signup_form': ('input', 'checkbox', 'button'),
    'contact_form': ('input', 'textarea', 'button'), 'search_header': ('search_bar', 'link'),
    'product_grid': ('card', 'image', 'pagination'), 'video_player': ('video', 'slider'),
    'data_table': ('table', 'pagination'), 'map_locator': ('map', 'search_bar'),
    'media_carousel': ('carousel', 'image'), 'breadcrumb_bar': ('breadcrumb', 'link'),
    'settings_panel': ('tabs', 'select', 'checkbox'), 'cookie_banner': ('modal', 'button'),
}

WORDS = (
    'home about pricing contact sign in up log out search shop cart checkout buy now free trial '
    'learn more get started features blog news team careers help support faq terms privacy '
    'policy cookies accept decline subscribe email password name message send submit next '
    'previous back continue cancel save edit delete share like follow comment reply read view all '
    'new popular top best sale offer discount price month year plan basic pro enterprise team '
    'user profile settings account dashboard report stats total revenue orders customers product '
    'products category filter sort by date rating reviews stars photo photos video videos play '
    'pause music playlist album artist event events today tomorrow calendar schedule book ticket '
    'tickets map location address city country phone open hours weather sunny rain chat online '
    'file files upload download folder recent course lesson lessons start enroll recipe minutes '
    'ingredients step steps job jobs apply remote full time welcome hello world our your the best '
    'fast secure simple modern design build grow together trusted by thousands loved worldwide '
    'error page not found try again skip done finish quick easy guide tips tutorial'
).split()


def _build_tokens() -> tuple[str, ...]:
  tokens = ['<pad>', '<bos>', '<eos>', '<unk>', 'class=', '>']
  for tag in SECTION_TAGS:
    tokens += [f'<{tag}', f'</{tag}>']
  tokens += [f'"{name}"' for name in SEMANTIC_CLASSES]
  for tag in ELEMENT_TAGS:
    tokens += [f'<{tag}', f'</{tag}>']
  tokens += list(dict.fromkeys(WORDS))
  return tuple(tokens)


TOKENS = _build_tokens()
TOKEN_TO_ID = {t: i for i, t in enumerate(TOKENS)}
NUM_TOKENS = len(TOKENS)
# The open-tag token of each element type: the consistency loss reads the detail head's
# probability of these tokens as "the markup says this element type is on the page".
ELEMENT_OPEN_TAG_IDS = tuple(TOKEN_TO_ID[f'<{tag}'] for tag in ELEMENT_TAGS)


def id_to_token(vocab_size: int) -> list[str]:
  """Token strings for ids 0..vocab_size-1 (unused ids read as '<unused_i>')."""
  return [TOKENS[i] if i < NUM_TOKENS else f'<unused_{i}>' for i in range(vocab_size)]
