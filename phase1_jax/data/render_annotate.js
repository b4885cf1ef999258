// Settles a rendered page and annotates it: render.py evaluates this function in an isolated
// world with the CSS that stops animations. Every visible element gets data-p1-box="x y w h"
// (render.RenderedPage states the rule). All boxes are read before any attribute is written, so
// there are no forced relayouts. With `texts`, also collects the page's visible text blocks (read
// in the same pass, before any write): one per text node, render.RenderedPage states the rule.
// Returns {html, height, texts: [[text, left, top, right, bottom, r, g, b], ...]}.
async (css, texts) => {
  const still = document.createElement('style');
  still.setAttribute('data-p1-still', '');
  still.textContent = css;
  (document.head || document.documentElement).append(still);
  await document.fonts.ready;
  const all = [...document.querySelectorAll('*')];
  for (const e of all) e.removeAttribute('data-p1-box');
  const boxes = new Map(), sx = window.scrollX, sy = window.scrollY;
  const opts = {opacityProperty: true, visibilityProperty: true};
  const union = (e) => {
    let b = null;
    for (const c of e.children) {
      const cb = boxes.get(c);
      if (cb) b = b ? [Math.min(b[0], cb[0]), Math.min(b[1], cb[1]),
                       Math.max(b[2], cb[2]), Math.max(b[3], cb[3])] : cb;
    }
    return b;
  };
  for (let i = all.length - 1; i >= 0; i--) {  // children before parents
    const e = all[i];
    let b = null;
    if (e === still) continue;
    if (e.checkVisibility(opts)) {  // Chromium >= 121
      const r = e.getBoundingClientRect();
      b = r.width > 0 && r.height > 0 ? [r.left + sx, r.top + sy, r.right + sx, r.bottom + sy]
                                      : union(e);
    } else if ((b = union(e)) && getComputedStyle(e).display !== 'contents') {
      b = null;  // hidden; display:contents has no box of its own but shows its children
    }
    if (b && b[2] > 0 && b[3] > 0) boxes.set(e, b);
  }
  const blocks = texts ? textBlocks(still, opts, sx, sy) : [];
  for (const [e, b] of boxes) {
    const x = Math.round(b[0]), y = Math.round(b[1]);
    e.setAttribute('data-p1-box',
                   `${x} ${y} ${Math.round(b[2] - b[0])} ${Math.round(b[3] - b[1])}`);
  }
  const html = document.documentElement.outerHTML.replace(still.outerHTML, '');
  const height = Math.max(document.documentElement.scrollHeight,
                          document.body ? document.body.scrollHeight : 0);
  return {html, height, texts: blocks};

  // Each visible text node with non-blank text, in document order: its whitespace-collapsed text,
  // the union of its line boxes (page coordinates, unclipped) and its element's text colour.
  function textBlocks(skip, opts, sx, sy) {
    const found = [], colours = new Map(), range = document.createRange();
    const walker = document.createTreeWalker(document.documentElement, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      const text = node.data.replace(/\s+/g, ' ').trim();
      const el = node.parentElement;
      if (!text || !el || el === skip) continue;
      if (!colours.has(el)) colours.set(el, shownColour(el, opts));
      const colour = colours.get(el);
      if (!colour) continue;
      range.selectNodeContents(node);
      let b = null;
      for (const r of range.getClientRects()) {
        if (r.width <= 0 || r.height <= 0) continue;
        b = b ? [Math.min(b[0], r.left), Math.min(b[1], r.top),
                 Math.max(b[2], r.right), Math.max(b[3], r.bottom)]
              : [r.left, r.top, r.right, r.bottom];
      }
      if (b) found.push([text, b[0] + sx, b[1] + sy, b[2] + sx, b[3] + sy, ...colour]);
    }
    return found;
  }

  // [r, g, b] of el's text, or null when its text is hidden: visibility (inherited) is not
  // 'visible', or the nearest ancestor-or-self with a box of its own (display:contents has none)
  // fails checkVisibility (display:none, opacity:0 on it or above).
  function shownColour(el, opts) {
    const style = getComputedStyle(el);
    if (style.visibility !== 'visible') return null;
    let boxed = el;
    while (boxed && getComputedStyle(boxed).display === 'contents') boxed = boxed.parentElement;
    if (boxed && !boxed.checkVisibility(opts)) return null;
    return toRgb(style.color);
  }

  // A computed colour as 0-255 [r, g, b] (alpha dropped): rgb()/rgba() read directly, any other
  // syntax (color(), lab(), oklch() ...) painted on a 1 px canvas and read back.
  function toRgb(colour) {
    if (/^rgba?\(/.test(colour)) return colour.match(/[\d.]+/g).slice(0, 3).map(Number);
    const ctx = new OffscreenCanvas(1, 1).getContext('2d');
    ctx.fillStyle = colour;
    ctx.fillRect(0, 0, 1, 1);
    return [...ctx.getImageData(0, 0, 1, 1).data.slice(0, 3)];
  }
}
