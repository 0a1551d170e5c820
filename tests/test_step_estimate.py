"""The step-time lower bound (`sd_jax.training.step_estimate`) on a program whose kernels, bytes and
FLOPs are counted here by hand; the real training calls' estimates are checked in tests/test_aot.py."""
import pytest

from sd_jax.training.step_estimate import Chip, estimate_step, gate_weights

# A step loop of 10 steps; its body: one elementwise fusion over 1,000 floats and a gate whose open
# branch is a 3x3 convolution of 8x10x10x4 images into 4 channels, and whose closed branch copies
# the input. As XLA prints an optimised module (names with %, layouts, tuples).
PROGRAM = """\
HloModule jit_multi_step, is_scheduled=true

%fused_add (p0: f32[1000]) -> f32[1000] {
  %p0 = f32[1000]{0} parameter(0)
  ROOT %add.1 = f32[1000]{0} add(%p0, %p0)
}

%open (param.0: (f32[8,10,10,4], f32[3,3,4,4])) -> f32[8,10,10,4] {
  %param.0 = (f32[8,10,10,4]{3,2,1,0}, f32[3,3,4,4]{3,2,1,0}) parameter(0)
  %x.0 = f32[8,10,10,4]{3,2,1,0} get-tuple-element(%param.0), index=0
  %k.0 = f32[3,3,4,4]{3,2,1,0} get-tuple-element(%param.0), index=1
  %conv = (f32[8,10,10,4]{3,2,1,0}, u8[0]{0}) custom-call(%x.0, %k.0), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(multi_step)/while/body/cond"}
  ROOT %y.0 = f32[8,10,10,4]{3,2,1,0} get-tuple-element(%conv), index=0
}

%closed (param.1: (f32[8,10,10,4], f32[3,3,4,4])) -> f32[8,10,10,4] {
  %param.1 = (f32[8,10,10,4]{3,2,1,0}, f32[3,3,4,4]{3,2,1,0}) parameter(0)
  %x.1 = f32[8,10,10,4]{3,2,1,0} get-tuple-element(%param.1), index=0
  ROOT %copy.1 = f32[8,10,10,4]{3,2,1,0} copy(%x.1)
}

%body (state.0: (s32[], f32[1000], f32[8,10,10,4], f32[3,3,4,4], s32[])) -> (s32[], f32[1000], f32[8,10,10,4], f32[3,3,4,4], s32[]) {
  %state.0 = (s32[], f32[1000]{0}, f32[8,10,10,4]{3,2,1,0}, f32[3,3,4,4]{3,2,1,0}, s32[]) parameter(0)
  %i.0 = s32[] get-tuple-element(%state.0), index=0
  %v.0 = f32[1000]{0} get-tuple-element(%state.0), index=1
  %x.2 = f32[8,10,10,4]{3,2,1,0} get-tuple-element(%state.0), index=2
  %k.2 = f32[3,3,4,4]{3,2,1,0} get-tuple-element(%state.0), index=3
  %gate = s32[] get-tuple-element(%state.0), index=4
  %fusion.1 = f32[1000]{0} fusion(%v.0), kind=kLoop, calls=%fused_add
  %operands = (f32[8,10,10,4]{3,2,1,0}, f32[3,3,4,4]{3,2,1,0}) tuple(%x.2, %k.2)
  %cond.1 = f32[8,10,10,4]{3,2,1,0} conditional(%gate, %operands, %operands), branch_computations={%closed, %open}
  ROOT %next = (s32[], f32[1000]{0}, f32[8,10,10,4]{3,2,1,0}, f32[3,3,4,4]{3,2,1,0}, s32[]) tuple(%i.0, %fusion.1, %cond.1, %k.2, %gate)
}

%condition (state.1: (s32[], f32[1000], f32[8,10,10,4], f32[3,3,4,4], s32[])) -> pred[] {
  %state.1 = (s32[], f32[1000]{0}, f32[8,10,10,4]{3,2,1,0}, f32[3,3,4,4]{3,2,1,0}, s32[]) parameter(0)
  %i.1 = s32[] get-tuple-element(%state.1), index=0
  %limit = s32[] constant(10)
  ROOT %more = pred[] compare(%i.1, %limit), direction=LT
}

ENTRY %main.1 (init: (s32[], f32[1000], f32[8,10,10,4], f32[3,3,4,4], s32[])) -> (s32[], f32[1000], f32[8,10,10,4], f32[3,3,4,4], s32[]) {
  %init = (s32[], f32[1000]{0}, f32[8,10,10,4]{3,2,1,0}, f32[3,3,4,4]{3,2,1,0}, s32[]) parameter(0)
  %setup = (s32[], f32[1000]{0}, f32[8,10,10,4]{3,2,1,0}, f32[3,3,4,4]{3,2,1,0}, s32[]) copy(%init)
  ROOT %while.1 = (s32[], f32[1000]{0}, f32[8,10,10,4]{3,2,1,0}, f32[3,3,4,4]{3,2,1,0}, s32[]) while(%setup), condition=%condition, body=%body
}
"""
CHIP = Chip({"f32": 1e9, "bf16": 2e9}, bytes_per_s=1e6, launch_s=1e-3)
IMAGE = 8 * 10 * 10 * 4 * 4  # bytes of one 8x10x10x4 float32 array
KERNEL = 3 * 3 * 4 * 4 * 4


def test_a_hand_counted_step():
    p = 0.25
    estimate = estimate_step(PROGRAM, CHIP, [p])
    fusion = 2 * 1000 * 4  # reads and writes 1,000 floats
    compare = 1 + 4 + 4  # the loop's condition: two int32 in, one pred out
    conv_bytes, conv_flops = 2 * IMAGE + KERNEL, 2 * (8 * 10 * 10 * 4) * 9 * 4  # out x window x in-channels
    copy = 2 * IMAGE
    assert estimate["kernels"] == pytest.approx(1 + 1 + p + (1 - p))  # the entry's copy runs once per call, not per step
    assert estimate["bytes"] == pytest.approx(fusion + compare + p * conv_bytes + (1 - p) * copy)
    assert estimate["flops"] == pytest.approx(p * conv_flops)
    seconds = lambda moved, flops=0.0: max(moved / 1e6, flops / 1e9) + 1e-3
    assert estimate["seconds"] == pytest.approx(seconds(fusion) + seconds(compare) + p * seconds(conv_bytes, conv_flops)
                                                + (1 - p) * seconds(copy))
    assert estimate["conditionals"] == 1 and not estimate["gates_paired_with_blocks"]  # one conditional, one gate
    assert estimate["open_gate"]["flops"] == pytest.approx(2 * conv_flops)  # a gate: forward and backward conditional
    assert estimate["closed_gate"]["bytes"] == pytest.approx(2 * copy)


def test_gates_pair_with_blocks_forward_then_backward():
    assert gate_weights(4, [1.0, 0.25, 0.5]) == ([0.25, 0.5, 0.5, 0.25], True)  # the p = 1 block has no gate
    assert gate_weights(3, [1.0, 0.25, 0.5]) == ([0.375] * 3, False)  # scanned blocks: their mean
    assert gate_weights(0, [1.0, 1.0]) == ([], False)
