"""phase1_jax.data.bpe: the prepared dataset's tokenizer (reserved ids, element open tags,
round trip)."""
from __future__ import annotations

import os

import numpy as np

from phase1_jax.data import bpe, html_pages, records, vocab


def test_tokenizer_round_trip_and_reserved_ids(prepared):
  root, out, meta, pages, _ = prepared
  tok = bpe.load(os.path.join(out, records.TOKENIZER_FILE))
  assert [tok.token_to_id(t) for t in bpe.SPECIAL_TOKENS] == [0, 1, 2, 3]
  assert meta['element_types'] == list(html_pages.SEMANTIC.element_types)
  assert meta['element_open_tag_ids'] == [4 + vocab.ELEMENT_TYPES.index(t)
                                          for t in meta['element_types']]
  assert meta['vocab_size'] == tok.get_vocab_size() <= 320
  rng = np.random.default_rng()
  for rel in rng.choice(sorted(p for p, h in pages.items() if h), 4, replace=False):
    markup = html_pages.parse_page(pages[rel].encode()).markup
    ids = tok.encode(markup).ids
    assert bpe.decode(tok, [vocab.BOS_ID, *ids, vocab.EOS_ID, 7, 9]) == markup
  # Each element open tag is one id, and never matched inside another tag name.
  for etype, text in enumerate(bpe.ELEMENT_OPEN_TOKENS):
    assert tok.encode(text + 'class="x">').ids[0] == 4 + etype
  ids = tok.encode('<abbr ><iframe ><address >x</address><input >').ids
  assert set(ids) & set(meta['element_open_tag_ids']) == {tok.token_to_id('<input ')}
  text = 'unseen caf\u00e9 \u4e2d\u6587 \U0001F600'
  assert bpe.decode(tok, tok.encode(text).ids) == text and vocab.UNK_ID not in tok.encode(text).ids
