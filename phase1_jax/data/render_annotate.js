// Settles a rendered page and annotates it: render.py evaluates this function in an isolated
// world with the CSS that stops animations. Every visible element gets data-p1-box="x y w h"
// (render.RenderedPage states the rule). All boxes are read before any attribute is written, so
// there are no forced relayouts. Returns {html, height}.
async (css) => {
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
  for (const [e, b] of boxes) {
    const x = Math.round(b[0]), y = Math.round(b[1]);
    e.setAttribute('data-p1-box',
                   `${x} ${y} ${Math.round(b[2] - b[0])} ${Math.round(b[3] - b[1])}`);
  }
  const html = document.documentElement.outerHTML.replace(still.outerHTML, '');
  const height = Math.max(document.documentElement.scrollHeight,
                          document.body ? document.body.scrollHeight : 0);
  return {html, height};
}
