"""phase1_jax.training.loop: train_and_evaluate end to end on the tiny config (layout, resume,
evaluation results) and on prepared pages."""
import json
import os

import jsonschema
import numpy as np
import pytest
from support import files_config, load_config

from phase1_jax import specs
from phase1_jax.data import bpe, records
from phase1_jax.inference import generation
from phase1_jax.training import loop


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """One epoch, then a second invocation that resumes and runs epoch 2."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = load_config('tiny')
  config.train.num_epochs = 1
  first = loop.train_and_evaluate(config, workdir)
  config.train.num_epochs = 2
  second = loop.train_and_evaluate(config, workdir)
  return config, workdir, first, second


def test_experiment_directory_layout(trained):
  _, workdir, _, _ = trained
  for name in ('config.json', 'training_history.json', 'evaluation_results.json',
               'model_parameters.json', 'checkpoints', 'tensorboard'):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(os.path.join(workdir,
                                                                                  'tensorboard')))


def test_resume_continues_without_duplicates(trained):
  config, workdir, _, _ = trained
  history = json.load(open(os.path.join(workdir, 'training_history.json')))
  epochs = [r['epoch'] for r in history if r['kind'] == 'epoch']
  assert epochs == [1, 2]
  steps = [r['step'] for r in history if r['kind'] == 'train']
  assert steps == sorted(set(steps))
  steps_per_epoch = config.data.train_samples // config.train.batch_size
  assert history[-1]['step'] == 2 * steps_per_epoch


def test_evaluation_results_report_targets(trained):
  config, workdir, _, second = trained
  results = json.load(open(os.path.join(workdir, 'evaluation_results.json')))
  assert results == json.loads(json.dumps(second, default=float))
  for name in ('bleu', 'element_f1', 'semantic_accuracy'):
    entry = results['targets'][name]
    assert 0.0 <= entry['value'] <= 1.0
    assert entry['passed'] == (entry['value'] >= entry['target'])
  assert isinstance(results['targets']['all_passed'], bool)
  for name in ('element_f1', 'element_f1_generated', 'element_f1_macro', 'token_accuracy'):
    assert 0.0 <= results['metrics'][name] <= 1.0, name
  m = results['metrics']
  assert m['generated_pages'] == min(config.eval.bleu_samples, config.data.val_samples)
  assert 0 <= m['generated_unfinished'] <= m['generated_pages']
  assert results['checkpoint_step'] in (8, 16)


def test_trains_and_evaluates_on_prepared_pages(prepared, tmp_path):
  """configs/tiny.py on the prepared pages: a few steps, eval and BLEU (over token-id strings)."""
  _, out, meta, _, _ = prepared
  config = files_config(out)
  config.train.batch_size = 4
  config.train.num_epochs = 1
  config.eval.batch_size = 4
  config.eval.bleu_samples = 2
  report = loop.train_and_evaluate(config, str(tmp_path / 'run'))
  history = json.load(open(tmp_path / 'run' / 'training_history.json'))
  steps = meta['splits']['train']['num_records'] // 4
  assert [r['step'] for r in history if r['kind'] == 'epoch'] == [steps] and steps >= 2
  assert all(np.isfinite(r['loss']) for r in history if r['kind'] == 'train')
  m = report['metrics']
  assert report['num_pages'] == meta['splits']['val']['num_records']
  for k in ('val_loss', 'val_loss_consistency', 'bleu', 'element_f1', 'semantic_accuracy'):
    assert np.isfinite(m[k]), k
  # generate on the prepared pages: records valid against the schema, markup decoded by the
  # dataset's BPE (the same text the tokenizer gives for the record's ids).
  path, n = generation.generate_pages(specs.run_spec(config), str(tmp_path / 'run'), num_samples=3,
                                      output=str(tmp_path / 'pages.jsonl'))
  schema = json.load(open(generation.SCHEMA_PATH))
  tokenizer = bpe.load(os.path.join(out, records.TOKENIZER_FILE))
  lines = [json.loads(line) for line in open(path)]
  assert n == len(lines) == min(3, meta['splits']['val']['num_records'])
  for record in lines:
    jsonschema.validate(record, schema)
    assert record['markup'] == bpe.decode(tokenizer, record['token_ids'])
