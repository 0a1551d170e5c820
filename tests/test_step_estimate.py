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


def test_an_uninitialised_buffer_is_free():
    """`jax.lax.empty` lowers to an `AllocateBuffer` custom call on GPU and TPU, for which XLA
    launches nothing: a closed branch that returns one costs no kernel and no byte."""
    closed_copy = "ROOT %copy.1 = f32[8,10,10,4]{3,2,1,0} copy(%x.1)"
    assert closed_copy in PROGRAM
    program = PROGRAM.replace(closed_copy, 'ROOT %empty.1 = f32[8,10,10,4]{3,2,1,0} custom-call(), custom_call_target="AllocateBuffer"')
    p = 0.25
    estimate, with_copy = estimate_step(program, CHIP, [p]), estimate_step(PROGRAM, CHIP, [p])
    assert estimate["kernels"] == pytest.approx(with_copy["kernels"] - (1 - p))
    assert estimate["bytes"] == pytest.approx(with_copy["bytes"] - (1 - p) * 2 * IMAGE)
    assert estimate["closed_gate"]["kernels"] == 0 and estimate["closed_gate"]["bytes"] == 0


# A step loop whose body gathers 8 rows of a 1,000 x 16 table kept on the device (as train.py's
# on-device datasets are read) and writes a 16-float row into a 10 x 16 stack in place (as a scan
# keeps a value per iteration), and reads one slice of a 64-float vector.
PARTS = """\
HloModule jit_multi_step, is_scheduled=true

%fused_gather (param_0: f32[1000,16], param_1: s32[8,1]) -> f32[8,16] {
  %param_0 = f32[1000,16]{1,0} parameter(0)
  %param_1 = s32[8,1]{1,0} parameter(1)
  ROOT %gather.1 = f32[8,16]{1,0} gather(%param_0, %param_1), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,16}
}

%fused_stack (param_0.1: f32[10,16], param_1.1: f32[8,16], param_2.1: s32[]) -> f32[10,16] {
  %param_0.1 = f32[10,16]{1,0} parameter(0)
  %param_1.1 = f32[8,16]{1,0} parameter(1)
  %row = f32[1,16]{1,0} slice(%param_1.1), slice={[0:1], [0:16]}
  %param_2.1 = s32[] parameter(2)
  %zero = s32[] constant(0)
  ROOT %dus = f32[10,16]{1,0} dynamic-update-slice(%param_0.1, %row, %param_2.1, %zero)
}

%fused_slice (param_0.2: f32[64]) -> f32[4] {
  %param_0.2 = f32[64]{0} parameter(0)
  %part = f32[4]{0} slice(%param_0.2), slice={[8:12]}
  ROOT %twice = f32[4]{0} add(%part, %part)
}

%body (state.0: (s32[], f32[1000,16], s32[8,1], f32[10,16], f32[64])) -> (s32[], f32[1000,16], s32[8,1], f32[10,16], f32[64]) {
  %state.0 = (s32[], f32[1000,16]{1,0}, s32[8,1]{1,0}, f32[10,16]{1,0}, f32[64]{0}) parameter(0)
  %i.0 = s32[] get-tuple-element(%state.0), index=0
  %table = f32[1000,16]{1,0} get-tuple-element(%state.0), index=1
  %rows = s32[8,1]{1,0} get-tuple-element(%state.0), index=2
  %stack = f32[10,16]{1,0} get-tuple-element(%state.0), index=3
  %vector = f32[64]{0} get-tuple-element(%state.0), index=4
  %batch = f32[8,16]{1,0} fusion(%table, %rows), kind=kLoop, calls=%fused_gather
  %stacked = f32[10,16]{1,0} fusion(%stack, %batch, %i.0), kind=kLoop, calls=%fused_stack
  %sliced = f32[4]{0} fusion(%vector), kind=kLoop, calls=%fused_slice
  ROOT %next = (s32[], f32[1000,16]{1,0}, s32[8,1]{1,0}, f32[10,16]{1,0}, f32[64]{0}) tuple(%i.0, %table, %rows, %stacked, %vector)
}

%condition (state.1: (s32[], f32[1000,16], s32[8,1], f32[10,16], f32[64])) -> pred[] {
  %state.1 = (s32[], f32[1000,16]{1,0}, s32[8,1]{1,0}, f32[10,16]{1,0}, f32[64]{0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%state.1), index=0
  %limit = s32[] constant(10)
  ROOT %more = pred[] compare(%i.1, %limit), direction=LT
}

ENTRY %main.2 (init: (s32[], f32[1000,16], s32[8,1], f32[10,16], f32[64])) -> (s32[], f32[1000,16], s32[8,1], f32[10,16], f32[64]) {
  %init = (s32[], f32[1000,16]{1,0}, s32[8,1]{1,0}, f32[10,16]{1,0}, f32[64]{0}) parameter(0)
  ROOT %while.2 = (s32[], f32[1000,16]{1,0}, s32[8,1]{1,0}, f32[10,16]{1,0}, f32[64]{0}) while(%init), condition=%condition, body=%body
}
"""


def test_a_kernel_moves_only_the_parts_it_slices_gathers_and_updates():
    """A gather from a 64,000-byte table moves its 8 rows (and the indices), not the table; an
    in-place dynamic-update-slice writes its row (and reads the row's source), not the 640-byte
    stack; a slice reads its 4 floats of the vector."""
    estimate = estimate_step(PARTS, CHIP, [])
    gather = 8 * 16 * 4 + 8 * 4 + 8 * 16 * 4  # rows read, indices, result written
    stack = 16 * 4 + 16 * 4 + 4  # the row written, the row read (a slice of the batch), the index
    sliced = 4 * 4 + 4 * 4
    compare = 1 + 4 + 4
    assert estimate["kernels"] == pytest.approx(4)
    assert estimate["bytes"] == pytest.approx(gather + stack + sliced + compare)
