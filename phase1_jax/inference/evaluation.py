"""Evaluation on a split: teacher-forced losses and metrics, greedy-decoded BLEU, target report."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import TYPE_CHECKING

import jax
import numpy as np

from phase1_jax import baselines as baselines_lib
from phase1_jax import metrics as metrics_lib
from phase1_jax.data import pipeline, vocab
from phase1_jax.inference import decoding, mbr, visual_evaluation
from phase1_jax.training import parallel, reporting
from phase1_jax.training import state as state_lib
from phase1_jax.training.checkpoint import Checkpointer
from phase1_jax.training.step import LossSpec

if TYPE_CHECKING:   # specs imports this module
  from phase1_jax.specs import RunSpec

SCALAR_KEYS = ('loss', 'loss_detail', 'loss_semantic', 'loss_element', 'loss_consistency')
OPTIONAL_SCALAR_KEYS = ('loss_patch', 'loss_patch_words')   # with their loss weights > 0


# The scores that read the model's markup; on a pixel dataset the generated ones are the headline
# and the teacher-forced ones (which read the reference markup) go beside as *_teacher_forced.
HEADLINE_KEYS = ('element_precision', 'element_recall', 'element_f1', 'element_precision_macro',
                 'element_recall_macro', 'element_f1_macro', 'semantic_accuracy')


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """config.eval (+ decode, loss): batches of `batch_size`; BLEU and the generated scores on the
  first `bleu_samples` val pages decoded with `decode` from `decode_seed`; the targets
  ({metric: value}) the targets_score counts; `generated_headline` (pixel input): element and
  section scores read the generated markup; `render`: rendered evaluation, or None."""
  batch_size: int
  bleu_samples: int
  element_threshold: float
  targets: dict = dataclasses.field(compare=False)
  decode: decoding.DecodeSettings
  decode_seed: int
  loss: LossSpec
  vocab_size: int
  generated_headline: bool = False
  render: visual_evaluation.RenderEvalSpec | None = None


@dataclasses.dataclass
class Evaluator:
  """Compiled eval step and decoder (decode.strategy) for one model graph; call with params.

  `to_markup` (token ids -> markup: pipeline.markup_decoder) is needed for decode.strategy 'mbr',
  whose utility reads the candidates' markup, and for rendered evaluation (spec.render), as is
  `source` (the val split), whose references are rendered once, at the first call. Results hold
  `pictures` ({name: HxWx3}) when pages were rendered; the caller logs and removes them. With
  `par` the steps are compiled for its layout (jit: over its mesh, the params as sharded as in
  training, each batch split over the devices); without, plain jit on the params' devices."""
  spec: EvalSpec
  graphdef: object
  source: object = None
  par: parallel.DataParallel | None = None
  to_markup: object = None

  def __post_init__(self):
    if self.spec.render is not None and self.to_markup is None:
      raise ValueError('rendered evaluation (spec.render) needs to_markup')
    loss_spec, settings = self.spec.loss, self.spec.decode
    ids = decoding.TokenIds(vocab.BOS_ID, vocab.EOS_ID, vocab.PAD_ID)
    if self.par is None:
      self.eval_step = parallel.jit_eval_step(graphdef=self.graphdef, loss_spec=loss_spec)
      make = lambda s: parallel.jit_generate(graphdef=self.graphdef, settings=s, ids=ids)
    else:   # these take host batches and place them
      self.eval_step = self.par.eval_step(graphdef=self.graphdef, loss_spec=loss_spec)
      make = lambda s: self.par.generate(graphdef=self.graphdef, settings=s, ids=ids)
    self.generate = mbr.generator(make, settings, to_markup=self.to_markup, eos_id=ids.eos)
    self.id_to_token = vocab.id_to_token(self.spec.vocab_size)
    self.judge = None if self.spec.render is None else visual_evaluation.PageJudge(
        self.spec.render, self.source, self.to_markup)

  def __call__(self, params, source) -> dict[str, float]:
    c = self.spec
    acc = metrics_lib.MetricAccumulator(threshold=c.element_threshold)
    sums = dict.fromkeys(SCALAR_KEYS, 0.0)
    token_correct = token_total = pages = 0
    for batch, real in pipeline.eval_batches(source, batch_size=c.batch_size):
      out = jax.device_get(self.eval_step(params, batch))
      for k in SCALAR_KEYS + tuple(k for k in OPTIONAL_SCALAR_KEYS if k in out):
        sums[k] = sums.get(k, 0.0) + float(out[k]) * real   # batch means: weight by page count
      pages += real
      acc.add_elements(out['element_probs'][:real], batch['element_labels'][:real])
      acc.add_semantic(out['semantic_pred'][:real], batch['semantic_labels'][:real],
                       batch['semantic_mask'][:real])
      mask = batch['target_mask'][:real]
      token_correct += int(((out['detail_pred'][:real] == batch['targets'][:real]) & mask).sum())
      token_total += int(mask.sum())
    result = {('val_loss' if k == 'loss' else f'val_{k}'): v / pages for k, v in sums.items()}
    result.update(acc.result())
    result['token_accuracy'] = token_correct / max(token_total, 1)
    if c.bleu_samples:
      result.update(self.generate_and_score(params, source, c.bleu_samples))
      if c.generated_headline:
        for k in HEADLINE_KEYS:
          result[f'{k}_teacher_forced'] = result[k]
          result[k] = result[f'{k}_generated']
    return result

  def generate_and_score(self, params, source, num_pages: int) -> dict:
    """Generations (spec.decode: greedy by default) of the first `num_pages` pages, scored as a
    user would see them: corpus BLEU (0..1) against the reference markup; element P/R/F1 of
    the classifier and the semantic head's section classes reading the generated markup instead
    of the reference (`*_generated`; sections aligned to the reference tokens, see
    metrics.aligned_semantic_counts); how many of the `generated_pages` never wrote EOS before
    decode.max_len (`generated_unfinished`: they are scored as cut); with rendering on, the
    visual metrics of the first eval.render_samples (rendered while the next batch decodes)."""
    start = time.perf_counter()
    hyps, refs, unfinished, decode_seconds = [], [], 0, 0.0
    acc = metrics_lib.MetricAccumulator(threshold=self.spec.element_threshold)
    strings = lambda t: metrics_lib.tokens_to_strings(
        t, self.id_to_token, eos_id=vocab.EOS_ID, pad_id=vocab.PAD_ID, bos_id=vocab.BOS_ID)
    rng = jax.random.key(self.spec.decode_seed)
    with self.judge.session() if self.judge else contextlib.nullcontext() as session:
      for batch, real in pipeline.eval_batches(source, batch_size=self.spec.batch_size,
                                               limit=num_pages):
        t = time.perf_counter()
        out = jax.device_get(self.generate(params, batch['features'], batch['feature_mask'],
                                           rng))
        decode_seconds += time.perf_counter() - t
        tokens_BxT = out['tokens'][:real]
        finished_B = (tokens_BxT == vocab.EOS_ID).any(-1)
        if session is not None:
          session.add([row[:metrics_lib.length_before_eos(row, vocab.EOS_ID)].tolist()
                       for row in tokens_BxT])
        hyps += strings(tokens_BxT)
        unfinished += int((~finished_B).sum())
        refs += strings(batch['targets'][:real])
        acc.add_elements(out['element_probs'][:real], batch['element_labels'][:real])
        acc.add_semantic_generated(tokens_BxT, out['semantic'][:real], batch['targets'][:real],
                                   batch['semantic_labels'][:real], batch['semantic_mask'][:real],
                                   eos_id=vocab.EOS_ID)
      visual, pictures = session.result() if session is not None else ({}, {})
    generated = acc.result()
    scores = {f'{k}_generated': v for k, v in generated.items() if k.startswith('element_')}
    scores['semantic_accuracy_generated'] = generated['semantic_accuracy_generated']
    out = {'bleu': metrics_lib.bleu(hyps, refs), **scores, 'generated_pages': len(hyps),
           'generated_unfinished': unfinished, 'decode_seconds': decode_seconds, **visual,
           'bleu_decode_seconds': time.perf_counter() - start}
    if pictures:
      out['pictures'] = pictures
    return out


def with_targets(t: dict, result: dict) -> dict:
  """Adds the targets_score of the targets `t` (needs bleu; skipped without it)."""
  if all(k in result for k in t):
    result['targets_score'] = metrics_lib.targets_score(result, t)
  return result


def load_trained(run: RunSpec, workdir: str, *, which: str = 'best',
                 par: parallel.DataParallel | None = None):
  """The model graph and trained params of `workdir`'s best (or latest) checkpoint:
  (graphdef, params, step, extra). Falls back to the latest when no best is recorded.

  The params land on the layout `par` (default: DataParallel(run.mesh), this host's mesh): jit
  mode shards them over the mesh as in training, so a model too big for one device loads;
  pmap mode puts them on this process's first device. Pass the same `par` to Evaluator."""
  par = par or parallel.DataParallel(run.mesh)   # layout errors before any file is read
  # The restore target's structure: the optimizer state's does not depend on the schedule's
  # length, so any step count gives it.
  tx, _ = state_lib.make_optimizer(run.optimizer, steps_per_epoch=1)
  graphdef, abstract_state = state_lib.create_train_state(run.model, tx, seed=run.seed,
                                                          abstract=True)
  best, best_mode = run.checkpoint.best_metric, run.checkpoint.best_mode
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f'{ckpt_dir}: no checkpoints directory (train first)')
  with Checkpointer(ckpt_dir, best_metric=best, best_mode=best_mode) as ckpt:
    step = ckpt.best_step() if which == 'best' else ckpt.latest_step()
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'{ckpt_dir}: no checkpoint to evaluate')
    # Onto this layout, whatever mesh the run was saved from; pmap evaluates one replica.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = par.restore_target(abstract_state) if par.mode == 'jit' else jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_state)
    state, extra = ckpt.restore(step, target, expect_config=dict(run.architecture))
  return graphdef, state.params, step, extra


def evaluate_checkpoint(run: RunSpec, workdir: str, *, which: str = 'best'):
  """Restores the best (or latest) checkpoint of `workdir` and evaluates it on the val split.

  Writes and returns evaluation_results.json's content.
  """
  par = parallel.DataParallel(run.mesh)   # the run's layout, checked before anything loads
  source = pipeline.make_source(run.data, 'val')
  graphdef, params, step, extra = load_trained(run, workdir, which=which, par=par)
  targets = run.eval.targets
  evaluator = Evaluator(run.eval, graphdef, source, par=par,
                        to_markup=pipeline.markup_decoder(run.data, run.model.vocab_size))
  result = with_targets(targets, evaluator(params, source))
  pictures = result.pop('pictures', {})
  report = {
      'checkpoint_step': step,
      'epoch': extra.get('epoch'),
      'split': 'val',
      'num_pages': len(source),
      'metrics': result,
      'targets': metrics_lib.target_report(result, targets) if 'bleu' in result else None,
  }
  baselines = baselines_lib.load(run.data.path) if run.data.name == 'files' else None
  if baselines is not None:
    report['baselines'] = baselines
  if jax.process_index() == 0:
    reporting.atomic_write_json(os.path.join(workdir, 'evaluation_results.json'), report)
    # TensorBoard beside the training curves, at the evaluated checkpoint's step.
    with reporting.Reporter(workdir, append_only=True) as reporter:
      reporter.scalars(step, {k: v for k, v in result.items() if np.isscalar(v)},
                       prefix='evaluate/')
      reporter.images(step, pictures, prefix='evaluate/generated_')
  return report


def summary(report: dict) -> str:
  """What a user reads after an evaluation: the checkpoint's targets line, then the model beside
  the dataset's baselines (python -m phase1_jax.baselines writes them) when it has them."""
  targets = report['targets']
  if targets is None:
    line = 'targets not scored (no BLEU: eval.bleu_samples=0)'
  else:
    line = '  '.join(
        f'{k}={v["value"]:.4f} (target {v["target"]}, {"pass" if v["passed"] else "FAIL"})'
        for k, v in targets.items() if k != 'all_passed') + (
            '  -> all targets met' if targets['all_passed'] else '  -> targets not met')
  text = f'Best checkpoint (step {report["checkpoint_step"]}): {line}'
  if report.get('baselines'):
    text += '\n' + baselines_lib.comparison_table(report['metrics'], report['baselines'])
  return text
