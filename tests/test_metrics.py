"""Tests for phase1_jax.metrics against hand-computed values."""

import math

import numpy as np
import pytest
import sacrebleu

from phase1_jax import metrics

# ----------------------------------------------------------------- elements

# 3 pages x 4 element types. threshold 0.5 (>=, so 0.5 itself is predicted).
PROBS_3x4 = np.array([
    [0.9, 0.2, 0.6, 0.1],  # pred [1, 0, 1, 0]
    [0.7, 0.8, 0.3, 0.4],  # pred [1, 1, 0, 0]
    [0.1, 0.5, 0.4, 0.2],  # pred [0, 1, 0, 0]
])
TARGETS_3x4 = np.array([
    [1, 0, 0, 0],
    [1, 0, 1, 0],
    [0, 1, 1, 0],
])
# Per type (column):
#   type 0: pred [1,1,0] tgt [1,1,0] -> TP2 FP0 FN0 -> P=1   R=1 F=1
#   type 1: pred [0,1,1] tgt [0,0,1] -> TP1 FP1 FN0 -> P=1/2 R=1 F=2/3
#   type 2: pred [1,0,0] tgt [0,1,1] -> TP0 FP1 FN2 -> P=0   R=0 F=0
#   type 3: pred [0,0,0] tgt [0,0,0] -> inactive, excluded from macro
# Micro: TP=3 FP=2 FN=2 -> P=3/5 R=3/5 F=3/5
# Macro over the 3 active types:
#   P=(1+1/2+0)/3=1/2  R=(1+1+0)/3=2/3  F=(1+2/3+0)/3=5/9


def test_element_scores_hand_computed_3x4():
  s = metrics.element_scores(PROBS_3x4, TARGETS_3x4)
  assert s['element_precision'] == pytest.approx(3 / 5)
  assert s['element_recall'] == pytest.approx(3 / 5)
  assert s['element_f1'] == pytest.approx(3 / 5)
  assert s['element_precision_macro'] == pytest.approx(1 / 2)
  assert s['element_recall_macro'] == pytest.approx(2 / 3)
  assert s['element_f1_macro'] == pytest.approx(5 / 9)
  assert all(isinstance(v, float) for v in s.values())


def test_element_scores_threshold_and_fn_only_type():
  # threshold 0.85: preds only [0,0] -> type 0: pred [1,0,0] tgt [1,1,0]
  #   TP1 FP0 FN1 -> P=1 R=1/2 F=2/3
  # types 1, 2 have FN only (no TP+FP) -> P=0 (zero_division=0), R=0, F=0
  # Micro: TP=1 FP=0 FN=1+1+2=4 -> P=1 R=1/5 F=2*(1/5)/(6/5)=1/3
  # Macro over types 0,1,2: P=1/3 R=1/6 F=2/9
  s = metrics.element_scores(PROBS_3x4, TARGETS_3x4, threshold=0.85)
  assert s['element_precision'] == pytest.approx(1.0)
  assert s['element_recall'] == pytest.approx(1 / 5)
  assert s['element_f1'] == pytest.approx(1 / 3)
  assert s['element_precision_macro'] == pytest.approx(1 / 3)
  assert s['element_recall_macro'] == pytest.approx(1 / 6)
  assert s['element_f1_macro'] == pytest.approx(2 / 9)


def test_element_scores_no_active_types_is_zero():
  s = metrics.element_scores(np.full((2, 3), 0.1), np.zeros((2, 3)))
  assert all(v == 0.0 for v in s.values())


def test_element_scores_shape_mismatch_raises():
  with pytest.raises(ValueError):
    metrics.element_scores(PROBS_3x4, TARGETS_3x4[:, :3])


def _reference_element_scores(probs, targets, threshold):
  """Slow per-cell loop used as an independent reference."""
  b, e = probs.shape
  tp, fp, fn = [0] * e, [0] * e, [0] * e
  for i in range(b):
    for j in range(e):
      p, t = probs[i, j] >= threshold, bool(targets[i, j])
      tp[j] += p and t
      fp[j] += p and not t
      fn[j] += (not p) and t

  def prf(a, b_, c):
    pr = a / (a + b_) if a + b_ else 0.0
    rc = a / (a + c) if a + c else 0.0
    return pr, rc, (2 * pr * rc / (pr + rc) if pr + rc else 0.0)

  micro = prf(sum(tp), sum(fp), sum(fn))
  per = [prf(tp[j], fp[j], fn[j]) for j in range(e) if tp[j] + fp[j] + fn[j]]
  macro = [sum(x[k] for x in per) / len(per) for k in range(3)]
  return micro, macro


def test_element_scores_matches_loop_reference_random():
  rng = np.random.default_rng(0)
  probs = rng.uniform(size=(17, 9))
  targets = (rng.uniform(size=(17, 9)) < 0.3).astype(np.int32)
  targets[:, 4] = 0
  probs[:, 4] = 0.0  # one inactive type
  for thr in (0.3, 0.5, 0.7):
    s = metrics.element_scores(probs, targets, threshold=thr)
    micro, macro = _reference_element_scores(probs, targets, thr)
    got_micro = [s['element_precision'], s['element_recall'], s['element_f1']]
    got_macro = [s['element_precision_macro'], s['element_recall_macro'],
                 s['element_f1_macro']]
    assert got_micro == pytest.approx(micro)
    assert got_macro == pytest.approx(macro)


# ----------------------------------------------------------------- semantic

def test_semantic_accuracy_with_mask():
  pred = np.array([[1, 2, 3, 0], [4, 4, 1, 2]])
  labels = np.array([[1, 0, 3, 3], [4, 1, 1, 2]])
  mask = np.array([[1, 1, 1, 0], [1, 0, 1, 1]], dtype=bool)
  # row 0 masked-in positions 0,1,2: right, wrong, right (pos 3 wrong, masked)
  # row 1 masked-in positions 0,2,3: all right (pos 1 wrong, masked)
  # -> 5 / 6
  assert metrics.semantic_accuracy(pred, labels, mask) == pytest.approx(5 / 6)
  # Unmasked: row 0 has 2 right, row 1 has 3 right -> 5 / 8.
  assert metrics.semantic_accuracy(pred, labels, np.ones_like(mask)) == (
      pytest.approx(5 / 8))


def test_semantic_accuracy_empty_mask_is_zero():
  pred = np.array([[1, 2]])
  assert metrics.semantic_accuracy(pred, pred, np.zeros((1, 2), bool)) == 0.0


# ------------------------------------------------ semantic, generated markup

# A reference page of 10 distinct tokens; every token but 3 and 7 is in a section.
REF_IDS = np.arange(10, 20)
REF_LABELS = np.array([0, 1, 1, 2, 2, 2, 3, 0, 1, 1])
REF_MASK = np.array([1, 1, 1, 0, 1, 1, 1, 0, 1, 1], bool)   # 8 labelled tokens


def _aligned(gen_ids, gen_pred):
  return metrics.aligned_semantic_counts(gen_ids, gen_pred, REF_IDS, REF_LABELS, REF_MASK)


def test_aligned_semantic_identical_pages_equal_teacher_forced():
  """Generated == reference: the aligned score is the teacher-forced one, on fresh random
  pages each run (small vocabulary, so tokens repeat)."""
  rng = np.random.default_rng()
  for _ in range(20):
    n = int(rng.integers(1, 80))
    ids = rng.integers(0, 6, n)
    labels = rng.integers(0, 4, n)
    mask = rng.uniform(size=n) < 0.7
    pred = np.where(rng.uniform(size=n) < 0.3, rng.integers(0, 4, n), labels)
    assert metrics.aligned_semantic_counts(ids, labels, ids, labels, mask) == (
        mask.sum(), mask.sum())
    correct, total = metrics.aligned_semantic_counts(ids, pred, ids, labels, mask)
    assert total == mask.sum()
    assert correct == np.sum((pred == labels) & mask)
    if total:
      assert correct / total == metrics.semantic_accuracy(pred[None], labels[None], mask[None])


def test_aligned_semantic_missing_tokens_count_as_wrong():
  # Every other token generated, all with the right class: the labelled ones of
  # 10, 12, 14, 16, 18 (positions 0, 2, 4, 6, 8, all labelled) -> 5 of 8.
  kept = np.arange(0, 10, 2)
  assert _aligned(REF_IDS[kept], REF_LABELS[kept]) == (5, 8)
  # The first half: positions 0..4, of which 0, 1, 2, 4 are labelled -> 4 of 8.
  assert _aligned(REF_IDS[:5], REF_LABELS[:5]) == (4, 8)


def test_aligned_semantic_inserted_tokens_cost_nothing():
  gen_ids = np.insert(REF_IDS, [0, 3, 3, 7, 10], [90, 91, 92, 93, 94])
  gen_pred = np.insert(REF_LABELS, [0, 3, 3, 7, 10], [3, 3, 3, 3, 3])
  assert _aligned(gen_ids, gen_pred) == (8, 8)


def test_aligned_semantic_wrong_class_drops_by_its_share():
  pred = REF_LABELS.copy()
  pred[[0, 5, 9]] = 3        # three labelled tokens wrong
  pred[3] = 1                # an unlabelled token: not scored
  assert _aligned(REF_IDS, pred) == (5, 8)
  assert metrics.aligned_semantic_accuracy([REF_IDS], [pred], [REF_IDS], [REF_LABELS],
                                           [REF_MASK]) == pytest.approx(5 / 8)


def test_aligned_semantic_empty_generation_and_bad_shapes():
  assert _aligned(np.zeros(0, np.int32), np.zeros(0, np.int32)) == (0, 8)
  assert metrics.aligned_semantic_counts([], [], [], [], []) == (0, 0)
  with pytest.raises(ValueError):
    _aligned(REF_IDS, REF_LABELS[:3])
  with pytest.raises(ValueError):
    metrics.aligned_semantic_counts(REF_IDS, REF_LABELS, REF_IDS, REF_LABELS, REF_MASK[:4])


def test_accumulator_semantic_generated_cuts_padded_rows_at_eos():
  """Padded 2-D batches as evaluation has them: rows cut before EOS (id 2), pooled counts."""
  eos, pad = 2, 0
  ref_ids = np.array([[5, 6, 7, 8, eos, pad], [9, 5, eos, pad, pad, pad]])
  ref_labels = np.array([[1, 1, 2, 2, 0, 0], [3, 3, 0, 0, 0, 0]])
  ref_mask = np.array([[1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]], bool)   # 5 labelled
  gen_ids = np.array([[5, 7, 8, eos, 5, 6], [9, 5, 4, 4, 4, 4]])   # row 1 never wrote EOS
  gen_pred = np.array([[1, 2, 0, 1, 1, 1], [3, 0, 0, 0, 0, 0]])
  # Row 0: 5 -> 1 right, 6 missing, 7 -> 2 right, 8 -> 0 wrong (after EOS not read): 2 of 4.
  # Row 1: 9 -> 3 right: 1 of 1.  Pooled: 3 of 5.
  acc = metrics.MetricAccumulator()
  assert 'semantic_accuracy_generated' not in acc.result()
  acc.add_semantic_generated(gen_ids[:1], gen_pred[:1], ref_ids[:1], ref_labels[:1],
                             ref_mask[:1], eos_id=eos)
  assert acc.result()['semantic_accuracy_generated'] == pytest.approx(2 / 4)
  acc.add_semantic_generated(gen_ids[1:], gen_pred[1:], ref_ids[1:], ref_labels[1:],
                             ref_mask[1:], eos_id=eos)
  assert acc.result()['semantic_accuracy_generated'] == pytest.approx(3 / 5)
  assert metrics.aligned_semantic_accuracy(gen_ids, gen_pred, ref_ids, ref_labels, ref_mask,
                                           eos_id=eos) == pytest.approx(3 / 5)
  with pytest.raises(ValueError):
    acc.add_semantic_generated(gen_ids, gen_pred, ref_ids[:1], ref_labels, ref_mask)


# --------------------------------------------------------------------- bleu

def _random_corpus(rng, n, vocab=20, max_len=30):
  return [[f'w{t}' for t in rng.integers(0, vocab, size=rng.integers(5,
                                                                     max_len))]
          for _ in range(n)]


def test_bleu_identical_corpus_is_one():
  refs = _random_corpus(np.random.default_rng(1), 8)
  assert metrics.bleu(refs, refs) == pytest.approx(1.0)


def test_bleu_partial_match_equals_sacrebleu():
  rng = np.random.default_rng(2)
  refs = _random_corpus(rng, 6)
  hyps = [r[: len(r) - 2] + ['<div>', 'w3'] if i % 2 else r[1:]
          for i, r in enumerate(refs)]
  expected = sacrebleu.corpus_bleu(
      [' '.join(h) for h in hyps], [[' '.join(r) for r in refs]],
      tokenize='none').score / 100
  got = metrics.bleu(hyps, refs)
  assert got == pytest.approx(expected)
  assert 0.0 < got < 1.0


def test_bleu_hand_checkable_cases():
  # No unigram overlap -> 0.
  assert metrics.bleu([['<p>', 'x']], [['<div>', 'y', '</div>']]) == 0.0
  # All 1..4-gram precisions are 1; hyp len 4 < ref len 5 ->
  # BLEU = BP = exp(1 - 5/4).
  got = metrics.bleu([['<a>', 'b', 'c', '</a>']],
                     [['<a>', 'b', 'c', '</a>', 'e']])
  assert got == pytest.approx(math.exp(-0.25))
  # Tokens with markup chars are not re-split (tokenize='none'):
  # '<a>' vs '<a' '>' share no token.
  assert metrics.bleu([['<a>']], [['<a', '>']]) == 0.0


def test_bleu_empty_inputs():
  assert metrics.bleu([], []) == 0.0
  assert metrics.bleu([[]], [['a', 'b']]) == 0.0
  refs = [['a', 'b', 'c', 'd', 'e'], ['f', 'g', 'h', 'i']]
  mixed = metrics.bleu([[], refs[1]], refs)
  assert 0.0 <= mixed < 1.0
  with pytest.raises(ValueError):
    metrics.bleu([['a']], [])


# -------------------------------------------------------- tokens_to_strings

VOCAB = ['<pad>', '<bos>', '<eos>', '<a>', '</a>', 'x']


def test_tokens_to_strings_cuts_at_eos_and_drops_pad_bos():
  tokens = np.array([
      [1, 3, 5, 4, 2, 3, 3],   # cut at first EOS, later tokens ignored
      [1, 5, 0, 5, 0, 0, 0],   # no EOS: drop BOS and PAD
      [2, 3, 4, 2, 5, 5, 5],   # EOS first -> empty
      [3, 1, 5, 2, 2, 0, 0],   # BOS mid-sequence also dropped
  ])
  out = metrics.tokens_to_strings(tokens, VOCAB, eos_id=2, pad_id=0, bos_id=1)
  assert out == [['<a>', 'x', '</a>'], ['x', 'x'], [], ['<a>', 'x']]
  # Round-trip into bleu. Note corpus BLEU is 0 when the corpus has no
  # 4-gram at all (sacrebleu behaviour), even for identical decodes.
  assert metrics.bleu(out[:2], out[:2]) == 0.0
  assert metrics.bleu(out[:1] * 2 + [out[0] + out[1]],
                      out[:1] * 2 + [out[0] + out[1]]) == pytest.approx(1.0)


# ------------------------------------------------------------ target_report

def test_target_report_pass_and_fail():
  m = {'bleu': 0.31, 'element_f1': 0.85, 'semantic_accuracy': 0.84,
       'element_recall': 0.5}
  r = metrics.target_report(m)
  assert set(r) == {'bleu', 'element_f1', 'semantic_accuracy', 'all_passed'}
  assert r['bleu'] == {'value': 0.31, 'target': 0.30, 'passed': True}
  assert r['element_f1']['passed'] is True  # value == target passes
  assert r['semantic_accuracy']['passed'] is False
  assert r['all_passed'] is False
  m['semantic_accuracy'] = 0.9
  assert metrics.target_report(m)['all_passed'] is True
  custom = metrics.target_report(m, {'element_recall': 0.6})
  assert custom == {'element_recall': {'value': 0.5, 'target': 0.6,
                                       'passed': False},
                    'all_passed': False}


def test_target_report_missing_metric_raises_keyerror():
  with pytest.raises(KeyError, match='semantic_accuracy'):
    metrics.target_report({'bleu': 0.5, 'element_f1': 0.9})


# -------------------------------------------------------------- accumulator

def test_accumulator_equals_full_computation():
  rng = np.random.default_rng(3)
  num_types, t_len = 11, 13
  probs, tgts, preds, labels, masks = [], [], [], [], []
  for b in (4, 1, 7, 3, 5):
    probs.append(rng.uniform(size=(b, num_types)))
    tgts.append((rng.uniform(size=(b, num_types)) < 0.35).astype(np.int32))
    labels.append(rng.integers(0, 5, size=(b, t_len)))
    noise = rng.uniform(size=(b, t_len)) < 0.3
    preds.append(np.where(noise, rng.integers(0, 5, size=(b, t_len)),
                          labels[-1]))
    masks.append(rng.uniform(size=(b, t_len)) < 0.7)
  for thr in (0.5, 0.3):
    acc = metrics.MetricAccumulator(threshold=thr)
    for p, t, pr, lb, mk in zip(probs, tgts, preds, labels, masks):
      acc.add_elements(p, t)
      acc.add_semantic(pr, lb, mk)
    got = acc.result()
    want = metrics.element_scores(np.concatenate(probs), np.concatenate(tgts),
                                  threshold=thr)
    want['semantic_accuracy'] = metrics.semantic_accuracy(
        np.concatenate(preds), np.concatenate(labels), np.concatenate(masks))
    assert set(got) == set(want)
    for k in want:
      assert got[k] == pytest.approx(want[k], abs=1e-12), k
    assert 0.0 < got['element_f1'] < 1.0
    assert 0.0 < got['semantic_accuracy'] < 1.0


def test_accumulator_empty_and_shape_change():
  acc = metrics.MetricAccumulator()
  assert all(v == 0.0 for v in acc.result().values())
  acc.add_elements(PROBS_3x4, TARGETS_3x4)
  assert acc.result()['element_f1_macro'] == pytest.approx(5 / 9)
  with pytest.raises(ValueError):
    acc.add_elements(PROBS_3x4[:, :3], TARGETS_3x4[:, :3])


def test_targets_score_is_one_exactly_when_all_targets_pass():
  targets = {'bleu': 0.30, 'element_f1': 0.85, 'semantic_accuracy': 0.85}
  # bleu at half its target, the others above theirs: (0.5 + 1 + 1) / 3.
  values = {'bleu': 0.15, 'element_f1': 0.9, 'semantic_accuracy': 0.95}
  assert metrics.targets_score(values, targets) == pytest.approx(2.5 / 3)
  values['bleu'] = 0.31
  assert metrics.targets_score(values, targets) == 1.0
  assert metrics.target_report(values, targets)['all_passed']
