"""One HTML page -> normalised markup, per-character section classes and element types.

Labels follow an html_labels.LabelScheme. A recognised element is written with its type's
canonical tag (vocab.ELEMENT_TAGS, as on the synthetic pages), so each type's open tag is one BPE
token that the consistency loss reads, and the page's element types are exactly the types whose
open tag is in its markup. Every character inside a section carries the innermost section's
class index, -1 outside.

A rendered page (render.py's DOM, every visible element annotated with `data-p1-box="x y w h"`)
is converted as the screenshot shows it: elements without a box are invisible and dropped with
their content, and elements whose top lies at or below `max_height` (the captured height) are
dropped with the text that follows them, so target and input describe the same region.

Normalised markup: the <body> only; script, style, template, head-like tags, comments, hidden
inputs and svg contents dropped; open tags written `<tag` + attributes + `>`, always with a space
after the tag name (`<p >`), so an open-tag token never prefixes another tag (`<a ` vs `<abbr `);
only the KEPT_ATTRIBUTES (values truncated). Whitespace runs become one space; a space is kept
where it separates words (`to <a >`), and dropped next to block-level tags (`<p >x</p>`).
"""
from __future__ import annotations

import dataclasses
import re

import lxml.etree
import lxml.html
import numpy as np

from phase1_jax.data import vocab
from phase1_jax.data.html_labels import LabelScheme

KEPT_ATTRIBUTES = ('id', 'class', 'role', 'type', 'name', 'value', 'placeholder', 'alt',
                   'aria-label')
BOX_ATTRIBUTE = 'data-p1-box'
TAG_NAME = re.compile(r'[a-z][a-z0-9:-]*')
MAX_ATTRIBUTE_CHARS = 80
DROPPED = {'script', 'style', 'noscript', 'template', 'head', 'title', 'meta', 'link', 'base',
           'br', 'wbr', 'object', 'embed', 'param', 'source', 'track'}
VOID = {'img', 'input', 'hr', 'area', 'col'}
# Text next to these flows on one line: the whitespace between them separates words.
INLINE = {'a', 'abbr', 'b', 'bdi', 'bdo', 'cite', 'code', 'data', 'dfn', 'em', 'i', 'kbd', 'label',
          'mark', 'q', 's', 'samp', 'small', 'span', 'strong', 'sub', 'sup', 'time', 'u', 'var',
          'img', 'input', 'button', 'select', 'textarea', 'svg', 'del', 'ins', 'tt', 'big',
          'font', 'output', 'meter', 'progress', 'picture'}
WHITESPACE = re.compile(r'\s+')
# Control characters that text never holds (tab, newlines and form feed excepted), and in a
# browser's DOM the replacement character that stands for undecodable bytes.
_CONTROL_BYTES = bytes([*range(0, 9), *range(14, 32), 127])
_CONTROL_CHARS = (*map(chr, _CONTROL_BYTES), '\ufffd')
_UNICODE_BOMS = (b'\xff\xfe', b'\xfe\xff', b'\x00\x00\xfe\xff')
# The default scheme; prepare passes its own.
SEMANTIC = LabelScheme()


class PageError(ValueError):
  """The page cannot be converted (the message says why)."""


@dataclasses.dataclass
class ParsedPage:
  """markup: normalised markup. char_classes_N: int8 section class of each character (an index
  into the scheme's semantic_classes; -1 outside every section). element_types: sorted indices
  into the scheme's element_types. truncated: the markup was cut at `max_chars`.
  boxes_Nx6 (rendered pages): float32 rows (x, y, width, height, section class, element type),
  CSS px, of every written element that opens a section or is of an element type (-1 for the
  other label): where the screenshot shows each label (patches.patch_labels)."""
  markup: str
  char_classes_N: np.ndarray
  element_types: list[int]
  truncated: bool = False
  boxes_Nx6: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((0, 6), np.float32))


class _Full(Exception):
  """The markup reached max_chars."""


def _escape(text: str, quote: bool = False) -> str:
  text = text.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')
  return text.replace('"', '&quot;') if quote else text


class _Writer:
  """Accumulates markup pieces with their section class."""

  def __init__(self, scheme: LabelScheme, max_chars: int | None):
    self.scheme, self.max_chars = scheme, max_chars
    self.class_index = {n: i for i, n in enumerate(scheme.semantic_classes)}
    self.type_index = {n: i for i, n in enumerate(scheme.element_types)}
    self.pieces, self.classes, self.types, self.boxes = [], [], set(), []
    self.sections = []     # the open sections' class indices, innermost last
    self.chars, self.at_block = 0, True   # at_block: the last piece was a block-level tag

  def _add(self, piece: str):
    self.pieces.append(piece)
    self.classes.append(self.sections[-1] if self.sections else -1)
    self.chars += len(piece)
    if self.max_chars is not None and self.chars >= self.max_chars:
      raise _Full

  def text(self, text: str | None):
    if not text:
      return
    text = WHITESPACE.sub(' ', text)
    if self.at_block or (self.pieces and self.pieces[-1].endswith(' ')):
      text = text.lstrip(' ')
    if text:
      self._add(_escape(text))
      self.at_block = False

  def tag(self, piece: str, inline: bool):
    if not inline and self.pieces and self.pieces[-1].endswith(' ') and \
        not self.pieces[-1].startswith('<'):
      self.pieces[-1] = self.pieces[-1].rstrip(' ')    # no space before a block-level tag
      self.chars -= 1
      if not self.pieces[-1]:
        self.pieces.pop()
        self.classes.pop()
    self._add(piece)
    self.at_block = not inline


def _box(el) -> list[float] | None:
  """The element's rendered box [x, y, width, height] (render.py's attribute), None if it has
  none (invisible) or an unreadable one."""
  box = el.get(BOX_ATTRIBUTE)
  try:
    values = [float(v) for v in box.split()] if box else []
  except ValueError:
    return None
  return values if len(values) == 4 else None


def _walk(el, out: _Writer, rendered: bool, max_height: int | None) -> bool:
  """Writes el and its tail; False when el lies below the captured height (the walk of its
  parent's later children stops: what follows it in the page is below it too)."""
  tag = el.tag.lower() if isinstance(el.tag, str) else None
  if tag is None or tag in DROPPED or (tag == 'input' and (el.get('type') or '').lower()
                                        == 'hidden'):
    out.text(el.tail)
    return True
  box = _box(el) if rendered else None
  if rendered:
    if box is None:            # invisible: dropped with its content, its tail still shows
      out.text(el.tail)
      return True
    if max_height is not None and int(box[1]) >= max_height:
      return False
  if not TAG_NAME.fullmatch(tag):   # lxml's repair of broken markup can make names like 'div<<p'
    return _children(el, out, rendered, max_height) and (out.text(el.tail) or True)
  etype = out.scheme.element_type(el, tag)
  cls = out.scheme.section_class(el, tag)
  etype = out.type_index.get(etype)
  name = vocab.ELEMENT_TAGS[vocab.ELEMENT_TYPES.index(out.scheme.element_types[etype])] \
      if etype is not None else tag
  if cls is not None:
    out.sections.append(out.class_index[cls])
  if box is not None and (cls is not None or etype is not None):
    out.boxes.append(box + [out.class_index[cls] if cls is not None else -1,
                            -1 if etype is None else etype])
  attrs = ''.join(f' {a}="{_escape(" ".join(el.get(a).split())[:MAX_ATTRIBUTE_CHARS], True)}"'
                  for a in KEPT_ATTRIBUTES if el.get(a))
  inline = tag in INLINE
  out.tag(f'<{name}{attrs or " "}>', inline)
  if etype is not None:
    out.types.add(etype)
  whole = True
  if tag not in VOID and tag != 'svg':
    whole = _children(el, out, rendered, max_height)
    out.tag(f'</{name}>', inline)
  if cls is not None:
    out.sections.pop()
  if whole:
    out.text(el.tail)
  return whole


def _children(el, out: _Writer, rendered: bool, max_height: int | None) -> bool:
  out.text(el.text)
  return all(_walk(child, out, rendered, max_height) for child in el)


def _redirect_target(root) -> str | None:
  for meta in root.iter('meta'):
    if (meta.get('http-equiv') or '').strip().lower() == 'refresh':
      content = meta.get('content') or ''
      if 'url' in content.lower():
        return content.split('=', 1)[-1].strip()[:80]
  return None


def binary_reason(data: bytes | str) -> str | None:
  """Why `data` (a file's bytes, or the DOM a browser made of them) is no text page, or None.
  Binary junk named .html would otherwise parse into a 'page' of millions of junk tokens: its
  bytes hold NULs, and about 12% control characters, where text in any encoding holds next to
  none (UTF-16/32 pages, NULs and all, announce themselves with a byte-order mark)."""
  if isinstance(data, bytes):
    if data.startswith(_UNICODE_BOMS):
      return None
    if b'\0' in data:
      return 'not text: binary content (NUL bytes)'
    controls = len(data) - len(data.translate(None, _CONTROL_BYTES))
  else:
    controls = sum(map(data.count, _CONTROL_CHARS))
  if controls > max(8, 0.01 * len(data)):
    return f'not text: binary content ({controls / len(data):.0%} control characters)'
  return None


def parse_page(data: bytes | str, *, scheme: LabelScheme = SEMANTIC, rendered: bool = False,
               max_height: int | None = None, max_chars: int | None = None) -> ParsedPage:
  """Parses one page (broken markup is repaired by lxml). Raises PageError when nothing is left,
  and for a redirect stub (a <meta http-equiv="refresh"> with a URL). `rendered`: the DOM carries
  render.py's boxes (see the module docstring); `max_chars` bounds the markup (and the memory a
  huge page takes): the walk stops there and the page is marked truncated."""
  if not data.strip():
    raise PageError('empty file')
  reason = binary_reason(data)
  if reason is not None:
    raise PageError(reason)
  parser = lxml.html.HTMLParser(remove_comments=True, remove_pis=True, recover=True)
  try:
    root = lxml.html.document_fromstring(data, parser=parser)
  except (lxml.etree.ParserError, ValueError) as e:
    raise PageError(f'unparseable HTML ({e})') from None
  target = _redirect_target(root)
  if target is not None:
    raise PageError(f'redirect stub (meta refresh to {target})')
  body = root.find('body')
  out = _Writer(scheme, max_chars)
  truncated = False
  try:
    if body is not None:
      _children(body, out, rendered, max_height)
    else:
      all(_walk(child, out, rendered, max_height) for child in root)
  except _Full:
    truncated = True
  if out.pieces and out.pieces[-1].endswith(' ') and not out.pieces[-1].startswith('<'):
    out.pieces[-1] = out.pieces[-1].rstrip(' ')
  if not ''.join(out.pieces):
    raise PageError('no visible content in <body>' if rendered else 'no content in <body>')
  lengths = [len(p) for p in out.pieces]
  char_classes = np.repeat(np.array(out.classes, np.int8), lengths)
  boxes_Nx6 = np.array(out.boxes, np.float32).reshape(-1, 6)
  return ParsedPage(''.join(out.pieces), char_classes, sorted(out.types), truncated, boxes_Nx6)
