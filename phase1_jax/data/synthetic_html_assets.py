"""The shared stylesheet and the drawn pictures of the synthetic HTML pages (synthetic_html.py).

One look per section type lives in STYLE_CSS; a page varies it through CSS custom properties in
inline styles. Pictures are simple numpy drawings written as PNG with zlib (no imaging library).
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

IMAGE_KINDS = ('photo', 'map', 'album', 'product', 'profile', 'report', 'weather')
IMAGE_VARIANTS = 3
IMAGE_SIZE = (160, 240)   # rows, columns; displayed at 3:2

STYLE_CSS = """\
*{box-sizing:border-box}
body{margin:0 auto;max-width:var(--w);font-family:var(--font);font-size:var(--fs);
  line-height:1.35;background:var(--page);color:#1f2937;accent-color:var(--accent)}
body>*{margin:0 0 var(--gap)} body>div{display:grid;gap:var(--gap);align-items:start}
body>div>*{min-width:0} body>form,body>article{max-width:var(--fw);margin-inline:var(--ml) auto}
header,nav,main,aside,footer,form,article,section,fieldset,dialog{display:flex;flex-wrap:wrap;
  gap:12px 16px;align-items:center;padding:var(--pad,16px)}
h1,h2,h3,p,table,details,textarea,ul,ol,[role=tablist]{flex-basis:100%;margin:0}
:is(aside,form,dialog)>*{flex-basis:auto;max-width:100%}
:is(aside,form)>:is(p,table,details,textarea,ul,ol){align-self:stretch}
h1{font-size:calc(var(--fs)*1.75)} h2{font-size:calc(var(--fs)*1.45)}
h3{font-size:calc(var(--fs)*1.2)}
header{background:var(--bg);color:#fff;text-align:var(--ta);justify-content:var(--ta)}
header button{background:#fff;color:var(--accent)} :is(header,nav) :is(a,svg){color:#fff}
nav{background:var(--bg);color:#fff;padding:12px var(--pad);gap:12px 24px;
  justify-content:var(--ta)} nav a{text-decoration:none;font-weight:bold}
:is(nav,footer) img{width:auto;height:40px} main{background:#fff;border-radius:var(--radius)}
aside{flex-direction:column;align-items:flex-start;border-left:4px solid var(--accent)}
:is(aside,section[aria-label],form[role]){background:color-mix(in srgb,var(--accent) var(--mix),
  #fff)}
footer{background:var(--bg);font-size:max(14px,calc(var(--fs)*.85));color:#374151;
  justify-content:var(--ta);text-align:var(--ta)} footer a{color:#374151}
form:not([role]){flex-direction:column;align-items:flex-start;background:#fff;
  border:2px solid #d1d5db;border-radius:var(--radius)}
form:not([role]) :is(input[type=text],textarea,select){width:100%}
form[role]{flex-wrap:nowrap;justify-content:center}
input[type=search]{width:min(420px,100%);border-radius:999px;padding:8px 16px}
form[role] input[type=search]{flex:0 1 420px}
article{background:#fff;border-radius:var(--radius);border-top:4px solid var(--accent);
  box-shadow:0 2px 10px rgba(0,0,0,.18)}
section[aria-label]{justify-content:center;text-align:center} section h2{color:var(--accent)}
section[aria-roledescription]{padding:0;gap:8px;flex-wrap:nowrap;justify-content:center;
  flex-basis:100%} section[aria-roledescription] img{min-width:40px}
nav[aria-label]{background:none;padding:0;gap:8px;flex-basis:100%;justify-content:flex-start}
nav[aria-label] a{color:var(--accent);font-weight:normal}
nav[aria-label] a+a::before{content:"/";color:#6b7280;margin-right:8px}
a{color:var(--accent)} button{font:inherit;padding:8px 18px;border:0;
  border-radius:var(--radius);background:var(--accent);color:#fff}
input,select,textarea{font:inherit;padding:6px 10px;border:1px solid #9ca3af;border-radius:4px;
  background:#fff;color:#111827}
input[type=checkbox],input[type=radio]{width:18px;height:18px;margin:0 6px 0 0;
  vertical-align:middle} input[type=range]{width:160px;vertical-align:middle}
label{white-space:nowrap} legend{font-weight:bold;padding:0 4px}
fieldset{border:1px solid #d1d5db;border-radius:var(--radius);padding:8px 14px;gap:8px 18px}
img{max-width:100%;height:auto;border-radius:var(--radius)}
table{border-collapse:collapse;background:#fff;color:#111827;text-align:left}
th,td{border:1px solid #d1d5db;padding:6px 12px} ul,ol{padding-left:1.4em}
:is(th,[role=menuitem]:first-child){background:color-mix(in srgb,var(--accent) 15%,#fff)}
progress{width:180px;height:18px}
video{background:#000;border-radius:var(--radius);max-width:100%;height:auto}
:is(dialog,[role=menu],details,table){color:#111827;background:#fff;border-radius:var(--radius)}
dialog{position:static;flex-direction:column;align-items:flex-start;margin:0;padding:14px 18px;
  border:1px solid #9ca3af;box-shadow:0 8px 24px rgba(0,0,0,.25)}
[role=tablist]{display:flex;flex-wrap:wrap;border-bottom:2px solid #d1d5db}
[role=tab]{background:none;color:inherit;border-radius:0}
[role=tab]:first-child{border-bottom:3px solid var(--accent);font-weight:bold}
[role=menu]{display:flex;flex-direction:column;min-width:160px;padding:4px 0;text-align:left;
  border:1px solid #d1d5db;box-shadow:0 4px 14px rgba(0,0,0,.2)} [role=menuitem]{padding:6px 16px}
[role=tooltip]{position:relative;padding:4px 10px;border-radius:4px;background:#111827;
  color:#fff;font-size:max(14px,.85em)}
[role=tooltip]::after{content:"";position:absolute;left:12px;top:100%;
  border:6px solid transparent;border-top-color:#111827}
details{text-align:left;border:1px solid #d1d5db;padding:8px 12px} details+details{margin-top:-8px}
summary{font-weight:bold} details p{margin-top:6px}
svg{fill:currentColor;color:var(--accent);flex:none}
"""


def png(rgb: np.ndarray) -> bytes:
  """An RGB uint8 [H, W, 3] array as PNG bytes (zlib + struct, no imaging library)."""
  h, w, _ = rgb.shape
  raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, -1)], axis=1).tobytes()
  chunk = lambda tag, data: (struct.pack('>I', len(data)) + tag + data
                             + struct.pack('>I', zlib.crc32(tag + data)))
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0))
          + chunk(b'IDAT', zlib.compress(raw, 9)) + chunk(b'IEND', b''))


def picture(kind: str, variant: int) -> np.ndarray:
  """A simple drawing of an image kind ('video' is a dark frame with a play triangle)."""
  h, w = (180, 320) if kind == 'video' else IMAGE_SIZE
  y, x = np.mgrid[0:h, 0:w]
  bg, fg, fg2 = (('#dbeafe', '#2563eb', '#f59e0b'), ('#fef3c7', '#b45309', '#16a34a'),
                 ('#dcfce7', '#15803d', '#db2777'))[variant]
  img = np.zeros((h, w, 3), np.uint8)
  paint = lambda mask, c: img.__setitem__(mask, [int(c[i:i + 2], 16) for i in (1, 3, 5)])
  disc = lambda cy, cx, rad: (y - cy) ** 2 + (x - cx) ** 2 < rad ** 2
  paint(np.ones((h, w), bool), '#111827' if kind == 'video' else bg)
  if kind == 'photo':
    paint(disc(40, 180, 22), fg2)
    paint(y > 110 - 25 * np.sin(x / 38.0), fg)
  elif kind == 'map':
    paint((abs(y - 60) < 5) | (abs(x - 0.6 * y - 70) < 5) | (abs(x - 190) < 4), '#ffffff')
    paint(disc(95, 120, 14) | ((abs(x - 120) < 16 - (y - 95) / 2) & (y > 95) & (y < 125)), fg2)
  elif kind == 'album':
    paint(disc(80, 120, 70), fg)
    paint(disc(80, 120, 22), fg2)
  elif kind == 'product':
    paint((abs(x - 120) < 60) & (y > 50) & (y < 140), fg)
    paint((abs(x - 120) < 60) & (y > 30) & (y <= 50), fg2)
  elif kind == 'profile':
    paint(disc(62, 120, 30), fg)
    paint(((x - 120) / 62.0) ** 2 + ((y - 160) / 55.0) ** 2 < 1, fg)
  elif kind == 'report':
    for k, top in enumerate((90, 50, 110, 30, 70)):
      paint((x >= 30 + 38 * k) & (x < 56 + 38 * k) & (y > top) & (y < 140), fg if k % 2 else fg2)
  elif kind == 'weather':
    paint(disc(60, 100, 34), fg2)
    paint(disc(100, 120, 28) | disc(90, 150, 32) | disc(105, 180, 24), '#ffffff')
  elif kind == 'video':
    paint((x > 140) & (x < 196) & (abs(y - 90) < (196 - x) * 0.55), '#ffffff')
  return img
