"""benchmarks/profile_step.py's HLO parsing and categories, on a hand-written HLO excerpt."""
# ruff: noqa: E501  (HLO lines are as XLA writes them)
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import profile_step  # noqa: E402

HLO = """HloModule jit_train_step, entry_computation_layout={}
  %loop_subtract_fusion.2 = f32[4096,50000]{1,0} fusion(%a, %b), kind=kLoop, calls=%f, metadata={op_name="jit(train_step)/transpose(jvp())/sub"}
  %custom-call.7 = (bf16[4096,768]{1,0}, s8[0]{0}) custom-call(%x, %y), custom_call_target="__cublas$gemm", metadata={op_name="jit(train_step)/dot_general"}
  %fusion.9 = f32[16,12,256,256]{3,2,1,0} fusion(%s), kind=kLoop, calls=%g, metadata={op_name="jit(train_step)/select_n"}
  %all-reduce.2 = (f32[2048,256]{1,0}, f32[256]{0}) all-reduce(%p, %q), replica_groups={}, to_apply=%add
  %custom-call.3 = (f32[8,256,4,64]{3,2,1,0}, f32[8,4,256]{2,1,0}) custom-call(%q, %k, %v, %l), custom_call_target="phase1_attention_forward", metadata={op_name="jit(train_step)/ffi_call"}
  ROOT %input_reduce_fusion.1 = bf16[768]{0} fusion(%d), kind=kInput, calls=%h
"""
SIZES = dict(vocab=50000, seq=256, patches=64)


def test_hlo_instructions_and_categories():
  ins = profile_step.hlo_instructions(HLO)
  assert ins['loop_subtract_fusion_2'] == ('fusion', [[4096, 50000]],
                                           'jit(train_step)/transpose(jvp())/sub')
  assert ins['custom_call_7'][0] == 'custom-call:__cublas$gemm'
  cat = lambda kernel, name: profile_step.categorize(kernel, ins.get(name), **SIZES)
  assert cat('loop_subtract_fusion_2', 'loop_subtract_fusion_2') == 'vocab N x V'
  assert cat('custom-call.7', 'custom_call_7') == 'matmul'
  assert cat('nvjet_sm90_tst_128x160_64x5', 'nvjet_sm90_tst_128x160_64x5') == 'matmul'
  assert cat('fusion.9', 'fusion_9') == 'attention'
  assert cat('custom-call.3', 'custom_call_3') == 'attention'   # the fused_cpu kernel
  assert cat('all-reduce.2', 'all_reduce_2') == 'collective'
  assert cat('input_reduce_fusion_1', 'input_reduce_fusion_1') == 'reduction'
  assert cat('memcpy128', 'memcpy128') == 'layer stacking'
  # A vocabulary as wide as another layer is ambiguous: the caller passes vocab=None.
  assert profile_step.categorize('loop_subtract_fusion_2', ins['loop_subtract_fusion_2'],
                                 vocab=None, seq=256, patches=64) == 'other'


def test_device_balance_per_step_and_device():
  def op(name, device, tid, dur_us, run_id='7'):
    return {'name': name, 'tid': tid, 'dur': dur_us,
            'args': {'device_ordinal': device, 'run_id': run_id, 'hlo_op': name}}
  events = [
      # Thread 1 runs device 0's ops, and one of device 1's; thread 2 runs device 1's.
      op('ynn_fusion.1', '0', 1, 500_000), op('ynn_fusion.1', '1', 2, 600_000),
      op('add_fusion.3', '0', 1, 100_000), op('add_fusion.3', '1', 1, 50_000),
      op('all-reduce.2', '0', 1, 250_000), op('all-reduce.2', '1', 2, 4_000),
      # A one-device step (the optimizer's scalars, say) is left out.
      op('add_fusion.3', '0', 1, 9_000, run_id='8'),
  ]
  rows = profile_step.device_balance(events, lambda name: name.startswith('all-reduce'))
  assert len(rows) == 1 and rows[0]['run_id'] == '7'
  assert rows[0]['devices'] == {
      '0': {'ops_ms': 600.0, 'collective_ms': 250.0, 'ops': 3, 'ops_on_other_threads': 0},
      '1': {'ops_ms': 650.0, 'collective_ms': 4.0, 'ops': 3, 'ops_on_other_threads': 1}}
