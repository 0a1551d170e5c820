"""Reading a compiled XLA program: its memory per device, its FLOPs, its conditionals, the
runtime steps (thunks) of an XLA:GPU program and which of them wait for the host, and the bytes a
TPU compilation that ran out of memory needed (sd_jax.aot reports them)."""
import collections
import contextlib
import glob
import os
import re

HOST_SYNCED = ("kConditional", "kWhile")  # thunks that wait for the host unless inside a kCommandBuffer


def memory(compiled) -> dict:
    """Bytes per device of a compiled call: arguments, outputs, temporaries, and their total (donated
    arguments that become outputs counted once)."""
    stats = compiled.memory_analysis()
    sizes = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
             "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
             "code": stats.generated_code_size_in_bytes}
    sizes["total"] = sizes["arguments"] + sizes["outputs"] - sizes["aliased"] + sizes["temporaries"] + sizes["code"]
    return sizes


def xla_flops(lowered, compiled):
    """XLA's FLOP count of one device's program, each loop body counted once (the step loop's: one
    training step) and each conditional at its costlier branch: the target compiler's analysis
    where it has one (TPU), else XLA:CPU's analysis of the same unoptimised program."""
    import jax
    from jax._src.lib import _jax

    with contextlib.suppress(Exception):
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        if analysis and analysis.get("flops"):
            return float(analysis["flops"])
    with contextlib.suppress(Exception):
        module = lowered.compiler_ir("hlo").as_hlo_module()
        return float(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)["flops"])
    return None


OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED: .*?\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


def out_of_memory(error: Exception):
    """The bytes a TPU compilation that ran out of HBM needed for temporaries (libtpu refuses to
    compile a program that cannot fit), or None for any other error."""
    match = OUT_OF_MEMORY.search(str(error))
    return None if match is None else int(float(match.group(1)) * 2**30)


def count_conditionals(hlo_text: str) -> int:
    """`conditional` instructions in an optimised HLO module's text."""
    return len(re.findall(r"\sconditional\(", hlo_text))


THUNK_LINE = re.compile(r"^(\s*)\d+: (k\w+)")


def thunk_counts(sequence: str):
    """({thunk kind: count}, host round trips) of an XLA:GPU thunk sequence dump: every kind,
    nested ones included, and the conditionals and loops that are not inside a command buffer."""
    kinds, host_synced, stack = collections.Counter(), 0, []
    for line in sequence.splitlines():
        match = THUNK_LINE.match(line)
        if not match:
            continue
        indent, kind = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        kinds[kind] += 1
        if kind in HOST_SYNCED and not any(k == "kCommandBuffer" for _, k in stack):
            host_synced += 1
        stack.append((indent, kind))
    return dict(kinds), host_synced


def gpu_thunks(dump_dir: str):
    """Thunk counts of the compiled module dumped in `dump_dir` (after XLA's thunk passes, which
    make the command buffers, when it wrote that file)."""
    for pattern in ("*thunk_sequence_after_thunk_passes.txt", "*thunk_sequence.txt"):
        files = sorted(glob.glob(os.path.join(dump_dir, pattern)), key=os.path.getsize)
        if files:
            with open(files[-1]) as f:
                return thunk_counts(f.read())
    return None
