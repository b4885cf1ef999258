"""The element and section builders of the synthetic HTML pages (synthetic_html.py lays them
out into pages and writes them).

Each builder draws from the page's random.Random, so a page stays a pure function of its seed and
index. An element is the HTML or ARIA construct its type names (ELEMENTS); a section is one
landmark with its fixed head and tail, elements drawn with its SIGNATURE, and inline custom
properties that vary its look (synthetic_html_assets.STYLE_CSS reads them).
"""
from __future__ import annotations

import random

from phase1_jax.data import vocab
from phase1_jax.data.synthetic_html_assets import IMAGE_KINDS, IMAGE_VARIANTS

SECTION_TYPES = ('header', 'nav', 'main', 'aside', 'footer', 'form', 'search', 'article',
                 'region')
ELEMENT_TYPES = ('button', 'link', 'image', 'input', 'checkbox', 'radio', 'slider', 'search_bar',
                 'table', 'list', 'heading', 'paragraph', 'textarea', 'select', 'progress_bar',
                 'video', 'modal', 'tabs', 'dropdown', 'tooltip', 'accordion', 'icon',
                 'breadcrumb', 'carousel')
assert set(ELEMENT_TYPES) <= set(vocab.ELEMENT_TYPES)
LEXICON = tuple(dict.fromkeys(vocab.WORDS))
# Section type -> (favoured element types, fewest and most drawn elements); a draw takes any
# allowed type instead with probability OTHER_P.
SIGNATURE = {
    'header': (('paragraph', 'button', 'button', 'image', 'icon'), 1, 3),
    'nav': (('link', 'link', 'link', 'icon', 'button'), 3, 6),
    'main': (('heading', 'paragraph', 'image', 'table', 'list', 'video', 'tabs', 'carousel',
              'breadcrumb', 'accordion', 'modal'), 2, 5),
    'aside': (('list', 'link', 'progress_bar', 'dropdown', 'tooltip', 'image'), 2, 4),
    'footer': (('link', 'link', 'paragraph', 'icon'), 3, 6),
    'form': (('input', 'input', 'checkbox', 'radio', 'select', 'textarea', 'slider'), 2, 4),
    'search': (('select', 'link'), 0, 1),
    'article': (('image', 'paragraph', 'link', 'button', 'accordion', 'list'), 1, 3),
    'region': (('image', 'button', 'progress_bar', 'tabs', 'carousel', 'table', 'modal'), 1, 3),
}
OTHER_P = 0.15
BARS = ('header', 'nav', 'footer', 'search')   # one-row sections: small elements only
INLINE_TYPES = ('button', 'link', 'image', 'icon', 'input', 'checkbox', 'select', 'search_bar',
                'tooltip', 'progress_bar', 'slider')
WIDE_TYPES = ('carousel', 'video', 'table', 'tabs')   # too wide for an aside
DARKS = ('#111827', '#1f2937', '#0f172a', '#1e293b', '#27272a', '#172554', '#14532d', '#3b0764')
GREYS = ('#e5e7eb', '#d1d5db', '#e7e5e4', '#cbd5e1')
ICONS = ('<circle cx="12" cy="12" r="9"/>', '<rect x="4" y="4" width="16" height="16" rx="3"/>',
         '<path d="M6 4l14 8-14 8z"/>', '<path d="M12 2l3 7h7l-6 4 2 8-6-5-6 5 2-8-6-4h7z"/>',
         '<path d="M3 5h18v3H3zM3 11h18v3H3zM3 17h18v3H3z"/>',
         '<path d="M12 21l-8-8a5 5 0 017-7l1 1 1-1a5 5 0 017 7z"/>')


# The page chrome speaks the conventional words of real sites, in their conventional order (a nav
# reads Home ... Contact, a form ends in Submit): which of them a page uses is drawn, their order
# is not. Content (headings, paragraphs, lists, tables) stays random lexicon words. So part of the
# text is predictable from what a low-resolution screenshot shows (a nav of four links), as on
# real pages, and part must be read. (section, element type) -> the ordered choices.
CHROME_TEXT = {
    ('nav', 'link'): ('home', 'about', 'features', 'products', 'pricing', 'shop', 'blog', 'news',
                      'team', 'careers', 'help', 'support', 'faq', 'contact'),
    ('footer', 'link'): ('about', 'blog', 'careers', 'help', 'faq', 'contact', 'terms',
                         'privacy policy', 'cookies'),
    ('header', 'button'): ('get started', 'free trial', 'learn more', 'sign up', 'log in'),
    ('form', 'input'): ('name', 'email', 'password', 'phone', 'address', 'city', 'country'),
    ('form', 'button'): ('submit', 'send', 'save', 'continue', 'apply'),
    ('search', 'button'): ('search', 'filter', 'sort by'),
}
CHROME_HTML = {'link': '<a href="#">{}</a>', 'button': '<button>{}</button>',
               'input': '<input type="text" placeholder="{}">'}


def words(r: random.Random, lo: int, hi: int, cap: bool = False) -> str:
  """lo..hi words of LEXICON, capitalised with `cap`."""
  text = ' '.join(r.choice(LEXICON) for _ in range(r.randint(lo, hi)))
  return text[:1].upper() + text[1:] if cap else text


def _image(r: random.Random, width: int | None = None) -> str:
  kind = r.choice(IMAGE_KINDS)
  w = width or r.choice((96, 120, 160, 200, 240))
  return (f'<img src="img/{kind}-{r.randrange(IMAGE_VARIANTS)}.png" alt="{kind}" width="{w}" '
          f'height="{w * 2 // 3}">')


def _labelled(r: random.Random, kind: str) -> str:
  checked = ' checked' if r.random() < 0.4 else ''
  return f'<label><input type="{kind}"{checked}> {words(r, 1, 2)}</label>'


def _table(r: random.Random) -> str:
  cols = r.randint(2, 3)
  rows = [''.join(f'<th>{words(r, 1, 2, True)}</th>' for _ in range(cols))]
  rows += [''.join(f'<td>{words(r, 1, 1)}</td>' for _ in range(cols))
           for _ in range(r.randint(2, 3))]
  return '<table>' + ''.join(f'<tr>{row}</tr>' for row in rows) + '</table>'


def _list(r: random.Random) -> str:
  tag, links = r.choice(('ul', 'ol')), r.random() < 0.3
  items = [f'<a href="#">{words(r, 1, 2)}</a>' if links else words(r, 1, 3, True)
           for _ in range(r.randint(2, 4))]
  return f'<{tag}>' + ''.join(f'<li>{x}</li>' for x in items) + f'</{tag}>'


def _accordion(r: random.Random) -> str:
  first_open = r.random() < 0.5
  return ''.join(
      f'<details open><summary>{words(r, 1, 3, True)}</summary><p>{words(r, 2, 4, True)}</p>'
      f'</details>' if k == 0 and first_open else
      f'<details><summary>{words(r, 1, 3, True)}</summary></details>'
      for k in range(r.randint(2, 3)))


def _many(r: random.Random, lo: int, hi: int, make) -> str:
  return ''.join(make(r) for _ in range(r.randint(lo, hi)))


ELEMENTS = {
    'button': lambda r: f'<button>{words(r, 1, 2, True)}</button>',
    'link': lambda r: f'<a href="#">{words(r, 1, 2)}</a>',
    'image': _image,
    'input': lambda r: f'<input type="text" placeholder="{words(r, 1, 2, True)}">',
    'checkbox': lambda r: _labelled(r, 'checkbox'),
    'radio': lambda r: f'<fieldset><legend>{words(r, 1, 2, True)}</legend>'
                       + _many(r, 2, 3, lambda q: _labelled(q, 'radio')) + '</fieldset>',
    'slider': lambda r: f'<label>{words(r, 1, 1, True)} <input type="range"></label>',
    'search_bar': lambda r: ('<input type="search" placeholder="'
                             + ' '.join(('Search', words(r, 0, 1))).rstrip() + '">'),
    'table': _table,
    'list': _list,
    'heading': lambda r: (lambda h: f'<h{h}>{words(r, 1, 3, True)}</h{h}>')(r.choice((2, 3))),
    'paragraph': lambda r: f'<p>{words(r, 2, 4, True)}</p>',
    'textarea': lambda r: f'<textarea rows="3" placeholder="{words(r, 1, 2, True)}"></textarea>',
    'select': lambda r: '<select>' + _many(r, 2, 3, lambda q: f'<option>{words(q, 1, 2, True)}'
                                            '</option>') + '</select>',
    'progress_bar': lambda r: f'<progress value="{r.randrange(10, 100, 10)}" max="100">'
                              '</progress>',
    'video': lambda r: (lambda w: f'<video poster="img/video-{r.randrange(IMAGE_VARIANTS)}.png" '
                        f'width="{w}" height="{w * 9 // 16}"></video>')(r.choice((320, 400, 480))),
    'modal': lambda r: f'<dialog open><p>{words(r, 2, 4, True)}</p>'
                       f'<button>{words(r, 1, 2, True)}</button></dialog>',
    'tabs': lambda r: '<div role="tablist">' + _many(
        r, 2, 4, lambda q: f'<button role="tab">{words(q, 1, 2, True)}</button>') + '</div>',
    'dropdown': lambda r: '<div role="menu">' + _many(
        r, 2, 4, lambda q: f'<div role="menuitem">{words(q, 1, 2, True)}</div>') + '</div>',
    'tooltip': lambda r: f'<span role="tooltip">{words(r, 1, 3, True)}</span>',
    'accordion': _accordion,
    'icon': lambda r: (lambda s: f'<svg width="{s}" height="{s}" viewBox="0 0 24 24">'
                       f'{r.choice(ICONS)}</svg>')(r.choice((24, 28, 32))),
    'breadcrumb': lambda r: '<nav aria-label="Breadcrumb">' + _many(
        r, 2, 4, lambda q: f'<a href="#">{words(q, 1, 1, True)}</a>') + '</nav>',
    'carousel': lambda r: (lambda w: '<section aria-roledescription="carousel">'
                           '<button>Back</button>' + _many(
                               r, 2, 3, lambda q: _image(q, w)) + '<button>Next</button>'
                           '</section>')(r.choice((160, 200))),
}


def _fixed(kind: str, r: random.Random) -> tuple[str, list[str], list[str]]:
  """A section's extra attributes, its leading elements (HTML) and the types of its trailing
  ones."""
  if kind == 'header':
    return '', [f'<h1>{words(r, 1, 3, True)}</h1>'], []
  if kind == 'search':
    return ' role="search"', [ELEMENTS['search_bar'](r)], ['button']
  if kind == 'article':
    return '', [f'<h2>{words(r, 1, 3, True)}</h2>', ELEMENTS['paragraph'](r)], []
  if kind == 'region':
    title = words(r, 1, 3, True)
    return f' aria-label="{title}"', [f'<h2>{title}</h2>'], []
  if kind == 'form':
    head = [f'<h2>{words(r, 1, 3, True)}</h2>'] if r.random() < 0.6 else []
    return '', head, ['button']
  return '', [], []


def _section_style(kind: str, r: random.Random) -> str:
  """Inline custom properties that vary the look of one section (the CSS reads them)."""
  style = {'--pad': f'{r.choice((12, 16, 20, 24, 32))}px'}
  if kind == 'header':
    dark = r.choice(DARKS)
    style.update({'--bg': r.choice(('var(--accent)', dark,
                                    f'linear-gradient(135deg,var(--accent),{dark})')),
                  '--pad': f'{r.choice((32, 40, 48, 56))}px', '--ta': r.choice(('center', 'left'))})
  elif kind == 'nav':
    style.update({'--bg': r.choice(DARKS), '--ta': r.choice(('left', 'center', 'right'))})
  elif kind == 'footer':
    style.update({'--bg': r.choice(GREYS), '--ta': r.choice(('center', 'left'))})
  elif kind in ('aside', 'region', 'search'):
    style['--mix'] = f'{r.choice((6, 10, 14, 18))}%'
  elif kind in ('form', 'article'):
    style.update({'--fw': f'{r.choice((420, 480, 560, 640, 760))}px',
                  '--ml': r.choice(('auto', '0px'))})
  return ';'.join(f'{k}:{v}' for k, v in style.items())


def _ordered(r: random.Random, choices: tuple[str, ...], n: int) -> list[str]:
  """n of choices in their given order (random lexicon words past the last)."""
  picked = sorted(r.sample(range(len(choices)), min(n, len(choices))))
  return [choices[i] for i in picked] + [words(r, 1, 2) for _ in range(n - len(picked))]


def section(kind: str, r: random.Random) -> str:
  """One landmark section: its fixed elements plus drawn ones, favouring its signature types."""
  favoured, lo, hi = SIGNATURE[kind]
  pool = INLINE_TYPES if kind in BARS else ELEMENT_TYPES
  if kind == 'aside':
    pool = tuple(t for t in pool if t not in WIDE_TYPES)
  types = [r.choice(favoured) if r.random() >= OTHER_P else r.choice(pool)
           for _ in range(r.randint(lo, hi))]
  attrs, head, tail = _fixed(kind, r)
  types += tail
  chrome = {t: iter(_ordered(r, CHROME_TEXT[kind, t], types.count(t)))
            for t in dict.fromkeys(types) if (kind, t) in CHROME_TEXT}
  body = head + [CHROME_HTML[t].format(next(chrome[t]).capitalize()) if t in chrome
                 else ELEMENTS[t](r) for t in types]
  tag = {'search': 'form', 'region': 'section'}.get(kind, kind)
  inner = '\n'.join(body)
  return f'<{tag}{attrs} style="{_section_style(kind, r)}">\n{inner}\n</{tag}>'
