"""The byte-level BPE of the detail tokens of prepared datasets (Hugging Face `tokenizers`).

Reserved ids: 0..3 are <pad> <bos> <eos> <unk> (as vocab.py), then one token per element type's
open tag, `<TAG ` with its trailing space (vocab.ELEMENT_TAGS order, ids 4..33): html_pages writes
every open tag with a space after the name, so `<a ` is one id and never a prefix of `<abbr `.
The consistency loss reads the detail head's probability of those ids (dataset.json
`element_open_tag_ids`). Byte-level: any text encodes without <unk>, and decoding is lossless.
"""
from __future__ import annotations

from typing import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from phase1_jax.data import vocab

SPECIAL_TOKENS = ('<pad>', '<bos>', '<eos>', '<unk>')
ELEMENT_OPEN_TOKENS = tuple(f'<{tag} ' for tag in vocab.ELEMENT_TAGS)
MIN_VOCAB_SIZE, MAX_VOCAB_SIZE = 300, 50000  # 256 bytes + 34 reserved ids + merges


def train(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
  """A BPE of at most `vocab_size` ids trained on `texts` (streamed: memory stays bounded)."""
  if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
    raise ValueError(f'vocab_size={vocab_size}: must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}]')
  tok = tokenizers.Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = list(SPECIAL_TOKENS) + [
      tokenizers.AddedToken(t, normalized=False, single_word=False) for t in ELEMENT_OPEN_TOKENS]
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=2, special_tokens=specials, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  ids = [tok.token_to_id(t) for t in (*SPECIAL_TOKENS, *ELEMENT_OPEN_TOKENS)]
  assert ids == list(range(len(ids))), ids   # the trainer puts special tokens first, in order
  return tok


def load(path: str) -> tokenizers.Tokenizer:
  return tokenizers.Tokenizer.from_file(path)


def element_open_tag_ids(tok: tokenizers.Tokenizer) -> list[int]:
  return [tok.token_to_id(t) for t in ELEMENT_OPEN_TOKENS]


def decode(tok: tokenizers.Tokenizer, ids) -> str:
  """Markup of detail token ids: stops at EOS, drops PAD and BOS, keeps the element open tags."""
  out = []
  for i in map(int, ids):
    if i == vocab.EOS_ID:
      break
    if i not in (vocab.PAD_ID, vocab.BOS_ID):
      out.append(i)
  return tok.decode(out, skip_special_tokens=False)
