"""Synthetic web pages as real HTML + CSS files, for headless Chromium to screenshot.

    python -m phase1_jax.data.synthetic_html --out pages/ --num_pages N [--seed 0] [--width 1024]

A page is a vertical stack of 2..7 landmark sections (an aside sits beside a main or an article in
a grid) holding real HTML elements with a few words of vocab.WORDS. The labels come from HTML
semantics alone (tags, ARIA roles, input types), so each section is a real landmark and each
element the element HTML or ARIA names for its type. The shared out/style.css gives each section
type one consistent look; per-page variation (fonts, colours, widths, paddings) rides on CSS
custom properties in inline `style` attributes, which the converter drops, and no ids or classes
are written, so the kept markup is predictable from the pixels. Images are PNGs in out/img/; no
scripts, no remote URLs. Each page is deterministic in (seed, index).
"""
from __future__ import annotations

import os
import random
import sys

from absl import app, flags

from phase1_jax.data import vocab
from phase1_jax.data.synthetic_html_assets import (
  IMAGE_KINDS,
  IMAGE_VARIANTS,
  STYLE_CSS,
  picture,
  png,
)

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
MIDDLE = ('main', 'aside', 'form', 'search', 'article', 'region')
MIDDLE_WEIGHTS = (4, 2, 2, 1, 3, 3)
FONTS = ('sans-serif', 'serif', 'monospace', 'Arial, sans-serif', 'Georgia, serif',
         "'Times New Roman', serif", "'Courier New', monospace", 'Verdana, sans-serif')
ACCENTS = ('#2563eb', '#16a34a', '#dc2626', '#9333ea', '#ea580c', '#0891b2', '#db2777', '#4f46e5',
           '#0d9488', '#b45309')
DARKS = ('#111827', '#1f2937', '#0f172a', '#1e293b', '#27272a', '#172554', '#14532d', '#3b0764')
PAGES = ('#ffffff', '#f8fafc', '#fafaf9', '#f5f5f4', '#fefce8', '#f0f9ff', '#fdf2f8')
GREYS = ('#e5e7eb', '#d1d5db', '#e7e5e4', '#cbd5e1')
ICONS = ('<circle cx="12" cy="12" r="9"/>', '<rect x="4" y="4" width="16" height="16" rx="3"/>',
         '<path d="M6 4l14 8-14 8z"/>', '<path d="M12 2l3 7h7l-6 4 2 8-6-5-6 5 2-8-6-4h7z"/>',
         '<path d="M3 5h18v3H3zM3 11h18v3H3zM3 17h18v3H3z"/>',
         '<path d="M12 21l-8-8a5 5 0 017-7l1 1 1-1a5 5 0 017 7z"/>')

# The shared stylesheet: one look per section type (tag / role / aria selectors, no classes); the
# pages vary it through the custom properties --w --font --fs --accent --page --gap --radius (body)
# and --pad --bg --ta --mix --fw --ml (sections).


class SyntheticHtmlError(ValueError):
  """The pages cannot be written; one line naming the flag or folder."""


def _words(r: random.Random, lo: int, hi: int, cap: bool = False) -> str:
  text = ' '.join(r.choice(LEXICON) for _ in range(r.randint(lo, hi)))
  return text[:1].upper() + text[1:] if cap else text


def _image(r: random.Random, width: int | None = None) -> str:
  kind = r.choice(IMAGE_KINDS)
  w = width or r.choice((96, 120, 160, 200, 240))
  return (f'<img src="img/{kind}-{r.randrange(IMAGE_VARIANTS)}.png" alt="{kind}" width="{w}" '
          f'height="{w * 2 // 3}">')


def _labelled(r: random.Random, kind: str) -> str:
  checked = ' checked' if r.random() < 0.4 else ''
  return f'<label><input type="{kind}"{checked}> {_words(r, 1, 2)}</label>'


def _table(r: random.Random) -> str:
  cols = r.randint(2, 3)
  rows = [''.join(f'<th>{_words(r, 1, 2, True)}</th>' for _ in range(cols))]
  rows += [''.join(f'<td>{_words(r, 1, 1)}</td>' for _ in range(cols))
           for _ in range(r.randint(2, 3))]
  return '<table>' + ''.join(f'<tr>{row}</tr>' for row in rows) + '</table>'


def _list(r: random.Random) -> str:
  tag, links = r.choice(('ul', 'ol')), r.random() < 0.3
  items = [f'<a href="#">{_words(r, 1, 2)}</a>' if links else _words(r, 1, 3, True)
           for _ in range(r.randint(2, 4))]
  return f'<{tag}>' + ''.join(f'<li>{x}</li>' for x in items) + f'</{tag}>'


def _accordion(r: random.Random) -> str:
  first_open = r.random() < 0.5
  return ''.join(
      f'<details open><summary>{_words(r, 1, 3, True)}</summary><p>{_words(r, 2, 4, True)}</p>'
      f'</details>' if k == 0 and first_open else
      f'<details><summary>{_words(r, 1, 3, True)}</summary></details>'
      for k in range(r.randint(2, 3)))


def _many(r: random.Random, lo: int, hi: int, make) -> str:
  return ''.join(make(r) for _ in range(r.randint(lo, hi)))


ELEMENTS = {
    'button': lambda r: f'<button>{_words(r, 1, 2, True)}</button>',
    'link': lambda r: f'<a href="#">{_words(r, 1, 2)}</a>',
    'image': _image,
    'input': lambda r: f'<input type="text" placeholder="{_words(r, 1, 2, True)}">',
    'checkbox': lambda r: _labelled(r, 'checkbox'),
    'radio': lambda r: f'<fieldset><legend>{_words(r, 1, 2, True)}</legend>'
                       + _many(r, 2, 3, lambda q: _labelled(q, 'radio')) + '</fieldset>',
    'slider': lambda r: f'<label>{_words(r, 1, 1, True)} <input type="range"></label>',
    'search_bar': lambda r: ('<input type="search" placeholder="'
                             + ' '.join(('Search', _words(r, 0, 1))).rstrip() + '">'),
    'table': _table,
    'list': _list,
    'heading': lambda r: (lambda h: f'<h{h}>{_words(r, 1, 3, True)}</h{h}>')(r.choice((2, 3))),
    'paragraph': lambda r: f'<p>{_words(r, 2, 4, True)}</p>',
    'textarea': lambda r: f'<textarea rows="3" placeholder="{_words(r, 1, 2, True)}"></textarea>',
    'select': lambda r: '<select>' + _many(r, 2, 3, lambda q: f'<option>{_words(q, 1, 2, True)}'
                                            '</option>') + '</select>',
    'progress_bar': lambda r: f'<progress value="{r.randrange(10, 100, 10)}" max="100">'
                              '</progress>',
    'video': lambda r: (lambda w: f'<video poster="img/video-{r.randrange(IMAGE_VARIANTS)}.png" '
                        f'width="{w}" height="{w * 9 // 16}"></video>')(r.choice((320, 400, 480))),
    'modal': lambda r: f'<dialog open><p>{_words(r, 2, 4, True)}</p>'
                       f'<button>{_words(r, 1, 2, True)}</button></dialog>',
    'tabs': lambda r: '<div role="tablist">' + _many(
        r, 2, 4, lambda q: f'<button role="tab">{_words(q, 1, 2, True)}</button>') + '</div>',
    'dropdown': lambda r: '<div role="menu">' + _many(
        r, 2, 4, lambda q: f'<div role="menuitem">{_words(q, 1, 2, True)}</div>') + '</div>',
    'tooltip': lambda r: f'<span role="tooltip">{_words(r, 1, 3, True)}</span>',
    'accordion': _accordion,
    'icon': lambda r: (lambda s: f'<svg width="{s}" height="{s}" viewBox="0 0 24 24">'
                       f'{r.choice(ICONS)}</svg>')(r.choice((24, 28, 32))),
    'breadcrumb': lambda r: '<nav aria-label="Breadcrumb">' + _many(
        r, 2, 4, lambda q: f'<a href="#">{_words(q, 1, 1, True)}</a>') + '</nav>',
    'carousel': lambda r: (lambda w: '<section aria-roledescription="carousel">'
                           '<button>Back</button>' + _many(
                               r, 2, 3, lambda q: _image(q, w)) + '<button>Next</button>'
                           '</section>')(r.choice((160, 200))),
}


def _fixed(kind: str, r: random.Random) -> tuple[str, list[str], list[str]]:
  """A section's extra attributes, its leading and its trailing elements."""
  if kind == 'header':
    return '', [f'<h1>{_words(r, 1, 3, True)}</h1>'], []
  if kind == 'search':
    return ' role="search"', [ELEMENTS['search_bar'](r)], [ELEMENTS['button'](r)]
  if kind == 'article':
    return '', [f'<h2>{_words(r, 1, 3, True)}</h2>', ELEMENTS['paragraph'](r)], []
  if kind == 'region':
    title = _words(r, 1, 3, True)
    return f' aria-label="{title}"', [f'<h2>{title}</h2>'], []
  if kind == 'form':
    head = [f'<h2>{_words(r, 1, 3, True)}</h2>'] if r.random() < 0.6 else []
    return '', head, [ELEMENTS['button'](r)]
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


def _section(kind: str, r: random.Random) -> str:
  """One landmark section: its fixed elements plus drawn ones, favouring its signature types."""
  favoured, lo, hi = SIGNATURE[kind]
  pool = INLINE_TYPES if kind in BARS else ELEMENT_TYPES
  if kind == 'aside':
    pool = tuple(t for t in pool if t not in WIDE_TYPES)
  types = [r.choice(favoured) if r.random() >= OTHER_P else r.choice(pool)
           for _ in range(r.randint(lo, hi))]
  attrs, head, tail = _fixed(kind, r)
  body = head + [ELEMENTS[t](r) for t in types] + tail
  tag = {'search': 'form', 'region': 'section'}.get(kind, kind)
  inner = '\n'.join(body)
  return f'<{tag}{attrs} style="{_section_style(kind, r)}">\n{inner}\n</{tag}>'


def _layout(r: random.Random) -> list[str | tuple[str, str]]:
  """Section types top to bottom; a (left, right) pair sits side by side (main or article with an
  aside). 2..7 sections, at least one of them content (MIDDLE), at most one main."""
  n = r.choice((2, 3, 3, 4, 4, 5, 5, 6, 7))
  top = ['header'] if r.random() < 0.55 else []
  if r.random() < 0.6:
    top.insert(r.randint(0, len(top)), 'nav')
  top = top[:n - 1]   # room for at least one content section
  bottom = ['footer'] if r.random() < 0.5 and len(top) < n - 1 else []
  middle, count, has_main = [], len(top) + len(bottom), False
  while count < n:
    kind = r.choices(MIDDLE, MIDDLE_WEIGHTS)[0]
    if kind == 'aside' and n - count < 2:
      continue
    if kind == 'main' and has_main:
      kind = 'article'
    if kind == 'aside':
      partner = 'article' if has_main else 'main'
      kind = ('aside', partner) if r.random() < 0.3 else (partner, 'aside')
    has_main = has_main or 'main' in kind
    middle.append(kind)
    count += 2 if isinstance(kind, tuple) else 1
  return top + middle + bottom


def page_html(index: int, seed: int, *, width: int = 1024) -> str:
  """The HTML of page `index` (a pure function of seed, index and width)."""
  r = random.Random(f'synthetic_html:{seed}:{index}')
  theme = {'--font': r.choice(FONTS), '--fs': f'{r.choice((15, 16, 17, 18))}px',
           '--accent': r.choice(ACCENTS), '--page': r.choice(PAGES),
           '--w': f'{r.randrange(int(width * 0.72) // 16, width // 16 + 1) * 16}px',
           '--gap': f'{r.choice((0, 8, 12, 16, 24))}px', '--radius': f'{r.choice((0, 4, 8))}px'}
  parts = []
  for item in _layout(r):
    if isinstance(item, tuple):
      side = f'{min(r.choice((200, 240, 280)), width // 4)}px'
      cols = f'{side} 1fr' if item[0] == 'aside' else f'1fr {side}'
      parts.append(f'<div style="grid-template-columns:{cols}">\n'
                   f'{_section(item[0], r)}\n{_section(item[1], r)}\n</div>')
    else:
      parts.append(_section(item, r))
  style = ';'.join(f'{k}:{v}' for k, v in theme.items())
  return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
          f'<title>{_words(r, 1, 3, True)}</title>\n<link rel="stylesheet" href="style.css">\n'
          f'</head>\n<body style="{style}">\n' + '\n'.join(parts) + '\n</body>\n</html>\n')


def write_pages(out: str, num_pages: int, *, seed: int = 0, width: int = 1024) -> list[str]:
  """Writes out/style.css, out/img/*.png and out/page-00000.html ...; returns the relative paths
  written. out must be new or empty, so a run never mixes with older pages."""
  if num_pages < 1:
    raise SyntheticHtmlError(f'--num_pages {num_pages}: must be at least 1')
  if not 480 <= width <= 4096:
    raise SyntheticHtmlError(f'--width {width}: must be in [480, 4096]')
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise SyntheticHtmlError(f'--out {out}: exists and is not an empty directory')
  os.makedirs(os.path.join(out, 'img'), exist_ok=True)
  files = {'style.css': lambda: STYLE_CSS.encode()}
  for kind in (*IMAGE_KINDS, 'video'):
    for v in range(IMAGE_VARIANTS):
      files[f'img/{kind}-{v}.png'] = lambda kind=kind, v=v: png(picture(kind, v))
  for i in range(num_pages):
    files[f'page-{i:05d}.html'] = lambda i=i: page_html(i, seed, width=width).encode()
  for rel, make in files.items():   # one file in memory at a time
    with open(os.path.join(out, rel), 'wb') as f:
      f.write(make())
  return list(files)


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    paths = write_pages(f.out, f.num_pages, seed=f.seed, width=f.width)
  except (SyntheticHtmlError, OSError) as e:
    sys.exit(f'synthetic_html: {e}')
  print(f'Wrote {f.num_pages} pages ({len(paths)} files) to {f.out}')


if __name__ == '__main__':
  # Defined here, not at import: prepare.py's flags share names (--out).
  flags.DEFINE_string('out', None, 'New (or empty) output directory.')
  flags.DEFINE_integer('num_pages', None, 'Number of pages to write.')
  flags.DEFINE_integer('seed', 0, 'Seed of the pages (page i depends on seed and i only).')
  flags.DEFINE_integer('width', 1024, 'Viewport width in CSS px the pages are laid out for.')
  flags.mark_flags_as_required(['out', 'num_pages'])
  app.run(main)
