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

from phase1_jax.data.synthetic_html_assets import (
  IMAGE_KINDS,
  IMAGE_VARIANTS,
  STYLE_CSS,
  picture,
  png,
)

# The builders live in synthetic_html_elements.py; their public names are re-exported here
# (callers use the label sets and the lexicon from here).
from phase1_jax.data.synthetic_html_elements import (  # noqa: F401
  BARS,
  CHROME_TEXT,
  DARKS,
  ELEMENT_TYPES,
  ELEMENTS,
  GREYS,
  ICONS,
  INLINE_TYPES,
  LEXICON,
  OTHER_P,
  SECTION_TYPES,
  SIGNATURE,
  WIDE_TYPES,
  section,
  words,
)

MIDDLE = ('main', 'aside', 'form', 'search', 'article', 'region')   # content sections (_layout)
MIDDLE_WEIGHTS = (4, 2, 2, 1, 3, 3)
# The page's theme rides on the body's custom properties --w --font --fs --accent --page --gap
# --radius (the sections' own are drawn by synthetic_html_elements); STYLE_CSS reads them.
FONTS = ('sans-serif', 'serif', 'monospace', 'Arial, sans-serif', 'Georgia, serif',
         "'Times New Roman', serif", "'Courier New', monospace", 'Verdana, sans-serif')
ACCENTS = ('#2563eb', '#16a34a', '#dc2626', '#9333ea', '#ea580c', '#0891b2', '#db2777', '#4f46e5',
           '#0d9488', '#b45309')
PAGES = ('#ffffff', '#f8fafc', '#fafaf9', '#f5f5f4', '#fefce8', '#f0f9ff', '#fdf2f8')


class SyntheticHtmlError(ValueError):
  """The pages cannot be written; one line naming the flag or folder."""


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
                   f'{section(item[0], r)}\n{section(item[1], r)}\n</div>')
    else:
      parts.append(section(item, r))
  style = ';'.join(f'{k}:{v}' for k, v in theme.items())
  return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
          f'<title>{words(r, 1, 3, True)}</title>\n<link rel="stylesheet" href="style.css">\n'
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
  from phase1_jax.config_validation import parse_flags
  app.run(main, flags_parser=parse_flags)   # --help exits 0, a bad flag is one line
