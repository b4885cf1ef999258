"""Evaluation metrics for the Phase 1 multi-task decoder (pure numpy, no I/O).

Shape suffixes follow nanodo style: B = batch (pages), T = sequence length,
E = number of UI element types.
"""

from __future__ import annotations

import difflib
from typing import Sequence

import numpy as np
import sacrebleu

TARGETS = {'bleu': 0.30, 'element_f1': 0.85, 'semantic_accuracy': 0.85}


def bleu(hypotheses: list[list[str]], references: list[list[str]]) -> float:
  """Corpus BLEU on a 0..1 scale (``sacrebleu.corpus_bleu(...).score / 100``).

  Each hypothesis/reference is a list of already-tokenized strings; tokens are
  joined with single spaces and scored with ``tokenize='none'`` so sacrebleu
  does not re-split them (tokens must therefore not contain spaces). Empty
  hypotheses are allowed; an empty corpus gives 0.0. As in sacrebleu, a
  corpus with no 4-gram (every sequence shorter than 4 tokens) scores 0.0.
  """
  if len(hypotheses) != len(references):
    raise ValueError(f'bleu: {len(hypotheses)} hypotheses vs '
                     f'{len(references)} references')
  if not hypotheses:
    return 0.0
  hyps = [' '.join(h) for h in hypotheses]
  refs = [' '.join(r) for r in references]
  score = sacrebleu.corpus_bleu(hyps, [refs], tokenize='none', force=True)
  return float(score.score) / 100.0


def tokens_to_strings(tokens_BxT: np.ndarray, id_to_token: Sequence[str], *,
                      eos_id: int, pad_id: int,
                      bos_id: int) -> list[list[str]]:
  """Maps token ids to strings, per row: cut at the first EOS (exclusive),
  then drop PAD and BOS ids. Returns B lists of token strings."""
  tokens_BxT = np.asarray(tokens_BxT)
  if tokens_BxT.ndim != 2:
    raise ValueError(f'tokens_BxT must be 2-D, got shape {tokens_BxT.shape}')
  out = []
  for row_T in tokens_BxT:
    eos_hits = np.flatnonzero(row_T == eos_id)
    if eos_hits.size:
      row_T = row_T[:eos_hits[0]]
    row_T = row_T[(row_T != pad_id) & (row_T != bos_id)]
    out.append([id_to_token[int(i)] for i in row_T])
  return out


def _element_counts(probs_BxE: np.ndarray, targets_BxE: np.ndarray,
                    threshold: float) -> tuple[np.ndarray, np.ndarray,
                                               np.ndarray]:
  """Per-type (tp_E, fp_E, fn_E) int64 counts; predictions = probs >= thr."""
  probs_BxE = np.asarray(probs_BxE)
  targets_BxE = np.asarray(targets_BxE).astype(bool)
  if probs_BxE.shape != targets_BxE.shape or probs_BxE.ndim != 2:
    raise ValueError(f'probs {probs_BxE.shape} and targets '
                     f'{targets_BxE.shape} must be equal 2-D (B, E) shapes')
  pred_BxE = probs_BxE >= threshold
  tp_E = np.sum(pred_BxE & targets_BxE, axis=0, dtype=np.int64)
  fp_E = np.sum(pred_BxE & ~targets_BxE, axis=0, dtype=np.int64)
  fn_E = np.sum(~pred_BxE & targets_BxE, axis=0, dtype=np.int64)
  return tp_E, fp_E, fn_E


def _safe_div(num, den):
  """num / den elementwise, 0 where den == 0 (sklearn zero_division=0)."""
  num = np.asarray(num, dtype=np.float64)
  den = np.asarray(den, dtype=np.float64)
  return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def _prf(tp, fp, fn):
  p = _safe_div(tp, tp + fp)
  r = _safe_div(tp, tp + fn)
  return p, r, _safe_div(2 * p * r, p + r)


def _scores_from_counts(tp_E: np.ndarray, fp_E: np.ndarray,
                        fn_E: np.ndarray) -> dict:
  p, r, f = _prf(tp_E.sum(), fp_E.sum(), fn_E.sum())
  active_E = (tp_E + fp_E + fn_E) > 0
  if active_E.any():
    pe, re, fe = _prf(tp_E[active_E], fp_E[active_E], fn_E[active_E])
    pm, rm, fm = pe.mean(), re.mean(), fe.mean()
  else:
    pm = rm = fm = 0.0
  return {
      'element_precision': float(p),
      'element_recall': float(r),
      'element_f1': float(f),
      'element_precision_macro': float(pm),
      'element_recall_macro': float(rm),
      'element_f1_macro': float(fm),
  }


def element_scores(probs_BxE: np.ndarray, targets_BxE: np.ndarray,
                   threshold: float = 0.5) -> dict:
  """Multi-label P/R/F1 for UI element types; predictions = probs >= threshold.

  Args:
    probs_BxE: per-page, per-type probabilities.
    targets_BxE: 0/1 (or bool) ground-truth presence.
  Returns floats: ``element_{precision,recall,f1}`` (micro: from TP/FP/FN
  summed over all pages and types) and ``element_{precision,recall,f1}_macro``
  (mean of per-type P/R/F1 over types that occur in targets or predictions,
  i.e. TP+FP+FN > 0). Division by zero gives 0 (sklearn ``zero_division=0``),
  so a type with FN but no TP+FP has precision 0. F1 = 2PR/(P+R), 0 if P+R=0.
  All values are 0.0 if no type is active.
  """
  return _scores_from_counts(*_element_counts(probs_BxE, targets_BxE,
                                              threshold))


def _semantic_counts(pred_BxT, labels_BxT, mask_BxT) -> tuple[int, int]:
  pred_BxT, labels_BxT = np.asarray(pred_BxT), np.asarray(labels_BxT)
  mask_BxT = np.asarray(mask_BxT).astype(bool)
  if not pred_BxT.shape == labels_BxT.shape == mask_BxT.shape:
    raise ValueError(f'shape mismatch: pred {pred_BxT.shape}, labels '
                     f'{labels_BxT.shape}, mask {mask_BxT.shape}')
  correct = int(np.sum((pred_BxT == labels_BxT) & mask_BxT))
  return correct, int(mask_BxT.sum())


def semantic_accuracy(pred_BxT: np.ndarray, labels_BxT: np.ndarray,
                      mask_BxT: np.ndarray) -> float:
  """Fraction of positions with mask_BxT true where pred_BxT == labels_BxT
  (integer class ids); 0.0 if the mask is empty."""
  correct, total = _semantic_counts(pred_BxT, labels_BxT, mask_BxT)
  return correct / total if total else 0.0


def aligned_semantic_counts(gen_ids_T, gen_pred_T, ref_ids_T, ref_labels_T,
                            ref_mask_T) -> tuple[int, int]:
  """(correct, total) of the section classes a page's *generated* tokens carry.

  The generated tokens (cut at EOS by the caller) are aligned with the reference tokens (no
  BOS/EOS/PAD) by difflib's matching blocks; a labelled reference token (ref_mask_T) is correct
  when a generated token is matched to it and predicts its class. total = ref_mask_T.sum(): a
  reference token nothing was matched to counts as wrong (missing content is not free), and
  extra generated tokens cost nothing here (BLEU sees them).
  """
  gen_ids_T, gen_pred_T = np.asarray(gen_ids_T), np.asarray(gen_pred_T)
  ref_ids_T, ref_labels_T = np.asarray(ref_ids_T), np.asarray(ref_labels_T)
  ref_mask_T = np.asarray(ref_mask_T).astype(bool)
  if gen_ids_T.ndim != 1 or gen_ids_T.shape != gen_pred_T.shape:
    raise ValueError(f'generated ids {gen_ids_T.shape} and predictions '
                     f'{gen_pred_T.shape} must be equal 1-D shapes')
  if ref_ids_T.ndim != 1 or not ref_ids_T.shape == ref_labels_T.shape == ref_mask_T.shape:
    raise ValueError(f'reference ids {ref_ids_T.shape}, labels {ref_labels_T.shape} and mask '
                     f'{ref_mask_T.shape} must be equal 1-D shapes')
  matcher = difflib.SequenceMatcher(None, ref_ids_T.tolist(), gen_ids_T.tolist(),
                                    autojunk=False)
  blocks = [(a, b, n) for a, b, n in matcher.get_matching_blocks() if n]
  ref_M = np.concatenate([np.arange(a, a + n) for a, _, n in blocks] or [[]]).astype(np.int64)
  gen_M = np.concatenate([np.arange(b, b + n) for _, b, n in blocks] or [[]]).astype(np.int64)
  hit_M = ref_mask_T[ref_M] & (gen_pred_T[gen_M] == ref_labels_T[ref_M])
  return int(hit_M.sum()), int(ref_mask_T.sum())


def length_before_eos(row_T: np.ndarray, eos_id: int | None) -> int:
  """Length of row_T before its first eos_id (all of it without one, or when eos_id is None)."""
  if eos_id is None:
    return len(row_T)
  hits = np.flatnonzero(np.asarray(row_T) == eos_id)
  return int(hits[0]) if hits.size else len(row_T)


def _aligned_batch_counts(gen_ids, gen_pred, ref_ids, ref_labels, ref_mask, *,
                          eos_id: int | None = None) -> tuple[int, int]:
  """aligned_semantic_counts summed over pages (rows of each argument: 1-D arrays or the rows
  of 2-D ones); with eos_id, each generated and reference row is first cut before its EOS."""
  rows = (gen_ids, gen_pred, ref_ids, ref_labels, ref_mask)
  if len({len(r) for r in rows}) != 1:
    raise ValueError(f'page counts differ: {[len(r) for r in rows]}')
  correct = total = 0
  for g_ids, g_pred, r_ids, r_labels, r_mask in zip(*rows, strict=True):
    g, r = length_before_eos(g_ids, eos_id), length_before_eos(r_ids, eos_id)
    c, t = aligned_semantic_counts(g_ids[:g], g_pred[:g], r_ids[:r], r_labels[:r], r_mask[:r])
    correct, total = correct + c, total + t
  return correct, total


def aligned_semantic_accuracy(gen_ids, gen_pred, ref_ids, ref_labels, ref_mask, *,
                              eos_id: int | None = None) -> float:
  """Semantic accuracy of generated pages (see aligned_semantic_counts), pooled over pages:
  correct / total labelled reference tokens; 0.0 when no reference token is labelled."""
  correct, total = _aligned_batch_counts(gen_ids, gen_pred, ref_ids, ref_labels, ref_mask,
                                         eos_id=eos_id)
  return correct / total if total else 0.0


def targets_score(metrics: dict, targets: dict = TARGETS) -> float:
  """Mean over targets of min(value / target, 1): 1.0 exactly when every target is met (a single
  number to pick the best checkpoint by)."""
  return float(np.mean([min(metrics[k] / t, 1.0) if t > 0 else 1.0 for k, t in targets.items()]))


def target_report(metrics: dict, targets: dict = TARGETS) -> dict:
  """``{name: {'value', 'target', 'passed'}}`` per target (passed iff
  value >= target) plus ``'all_passed'``. Raises KeyError on a missing
  metric."""
  report = {}
  for name, target in targets.items():
    if name not in metrics:
      raise KeyError(f'target_report: metric {name!r} missing from metrics')
    value = float(metrics[name])
    report[name] = {'value': value, 'target': float(target),
                    'passed': bool(value >= target)}
  report['all_passed'] = all(report[n]['passed'] for n in targets)
  return report


class MetricAccumulator:
  """Accumulates element TP/FP/FN per type and semantic correct/total counts
  (teacher-forced, and of generated pages when added) across eval batches;
  ``result()`` equals element_scores/semantic_accuracy/aligned_semantic_accuracy
  on the concatenated batches."""

  def __init__(self, threshold: float = 0.5):
    self.threshold = threshold
    self._tp_E = self._fp_E = self._fn_E = None
    self._sem_correct = 0
    self._sem_total = 0
    self._gen_sem = None   # [correct, total] of generated pages, once any is added

  def add_elements(self, probs_BxE: np.ndarray,
                   targets_BxE: np.ndarray) -> None:
    tp_E, fp_E, fn_E = _element_counts(probs_BxE, targets_BxE, self.threshold)
    if self._tp_E is None:
      self._tp_E, self._fp_E, self._fn_E = tp_E, fp_E, fn_E
      return
    if tp_E.shape != self._tp_E.shape:
      raise ValueError(f'element count changed: {self._tp_E.shape[0]} -> '
                       f'{tp_E.shape[0]}')
    self._tp_E = self._tp_E + tp_E
    self._fp_E = self._fp_E + fp_E
    self._fn_E = self._fn_E + fn_E

  def add_semantic(self, pred_BxT: np.ndarray, labels_BxT: np.ndarray,
                   mask_BxT: np.ndarray) -> None:
    correct, total = _semantic_counts(pred_BxT, labels_BxT, mask_BxT)
    self._sem_correct += correct
    self._sem_total += total

  def add_semantic_generated(self, gen_ids, gen_pred, ref_ids, ref_labels, ref_mask, *,
                             eos_id: int | None = None) -> None:
    """Generated pages' section classes against their references, one row per page (see
    aligned_semantic_counts; with eos_id each row is cut before its first EOS, so the padded
    arrays of a batch can be passed as they are)."""
    correct, total = _aligned_batch_counts(gen_ids, gen_pred, ref_ids, ref_labels, ref_mask,
                                           eos_id=eos_id)
    previous = self._gen_sem or [0, 0]
    self._gen_sem = [previous[0] + correct, previous[1] + total]

  def result(self) -> dict:
    """element_* keys (0.0 if nothing was added), semantic_accuracy, and
    semantic_accuracy_generated once add_semantic_generated was called."""
    if self._tp_E is None:
      zero_E = np.zeros(0, dtype=np.int64)
      out = _scores_from_counts(zero_E, zero_E, zero_E)
    else:
      out = _scores_from_counts(self._tp_E, self._fp_E, self._fn_E)
    out['semantic_accuracy'] = (self._sem_correct / self._sem_total
                                if self._sem_total else 0.0)
    if self._gen_sem is not None:
      correct, total = self._gen_sem
      out['semantic_accuracy_generated'] = correct / total if total else 0.0
    return out
