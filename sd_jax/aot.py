"""Check a run on a GPU or TPU before paying for one: compile its real training and evaluation
calls for the target with no device attached (deviceless ahead-of-time compilation) and report
what XLA made of them.

    python -m sd_jax.aot --config NAME|FILE [--config.KEY=VALUE ...] --target h100|h200|a100-40|a100-80|l4|t4|v4|v5e|v6e
        [--devices N] [--compiler-options project|none] [--xla-option KEY=VALUE ...] [--cuda-version 12.8.0]
        [--dump-to DIR] [--json] [--compare-constant]

Reported per device: compile seconds; memory (arguments, outputs, temporaries) against the chip's,
with "does not fit" and by how much; XLA's FLOPs for one training step and the multiply-add
estimate beside it; the conditionals (stochastic-depth gates) in the compiled step; on GPU the
runtime thunks by kind and the host round trips per step (conditionals and loops outside a CUDA
graph, each of which copies its predicate to the host and waits); a lower bound on the step time
(sd_jax.training.step_estimate: each kernel at the chip's peak FLOP/s or bandwidth, plus a launch
cost) with the expected kernels, bytes and FLOPs per step and what an open and a closed gate
cost; `--compare-constant` adds the constant-depth twin and the ratios. Needs the target's compiler:
pip install "sd_jax[aot-gpu]" (JAX's CUDA plugin) or "sd_jax[aot-tpu]" (libtpu). The compilation
runs in a child process, so a compiler crash is reported, not fatal. Exit codes: 0 done; 2 bad
input or a missing compiler; 3 the compiler failed or crashed.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from sd_jax import cli, targets
from sd_jax.training.compiled import count_conditionals, gpu_thunks, memory, out_of_memory, xla_flops
from sd_jax.training.step_estimate import estimate_step
from sd_jax.training.plan import make_plan, make_train_state, run_keys
from sd_jax.training.steps import (HOST_BATCH_SPEC, eval_variables, make_batch_errors, make_count_errors,
                                   make_host_train_steps, make_train_steps)

WORKER_FLAG = "--worker-output"
GPU_MEMORY_POOL = 0.75  # JAX preallocates 75% of a GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION)


@dataclasses.dataclass(frozen=True)
class DataShapes:
    """What the compiled calls need to know of a dataset: its sizes, not its images."""

    num_train: int
    num_val: int
    num_test: int
    image_shape: tuple
    num_classes: int
    translate: int
    flip: bool
    host_fed: bool


def data_shapes(config) -> DataShapes:
    """The dataset's split sizes and image shape, without reading it (bundled sets are read: tiny)."""
    from sd_jax.data import cifar_svhn, imagenet
    from sd_jax.config import HOST_FED_DATASETS

    if config.dataset in HOST_FED_DATASETS:
        held = round(imagenet.MINIVAL_FRACTION * imagenet.TRAIN_IMAGES)
        side = config.image_size
        return DataShapes(imagenet.TRAIN_IMAGES - held, held, imagenet.VAL_IMAGES, (side, side, 3),
                          imagenet.NUM_CLASSES, 0, True, True)
    if config.dataset in cifar_svhn.BUNDLED:
        ds = cifar_svhn.load_dataset(config.dataset)
        return DataShapes(len(ds.train), len(ds.val), len(ds.test), ds.image_shape, ds.num_classes, ds.translate,
                          ds.flip, False)
    spec = cifar_svhn.OFFICIAL[config.dataset]
    return DataShapes(*spec.split_sizes, (spec.image_side, spec.image_side, 3), spec.num_classes, spec.translate,
                      spec.flip, False)


def abstract(tree, sharding):
    """Shapes and dtypes of `tree` placed with `sharding` (jax.ShapeDtypeStruct leaves)."""
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def training_calls(config, devices, shapes: DataShapes):
    """(plan, [(name, jitted function, abstract arguments)]) for the run's training call and
    evaluation call on a data mesh of `devices`: the functions `train.py` compiles, with the
    arguments its feeds pass them (sd_jax.training.feeds: DeviceFeed / HostFeed)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from sd_jax.data import cifar_svhn


    from sd_jax.training import parallel
    mesh = Mesh(np.array(devices), (parallel.AXIS,))
    plan = make_plan(config, shapes.num_train, shapes.num_classes, shapes.translate, shapes.flip, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    variables = jax.eval_shape(plan.model.init, jax.random.key(0), jnp.zeros((1,) + shapes.image_shape))
    state = abstract(jax.eval_shape(functools.partial(make_train_state, plan=plan), variables), replicated)
    keys = abstract(jax.eval_shape(lambda: run_keys(config.seed)), replicated)
    mean, std = (abstract(jnp.asarray(s), replicated) for s in
                 cifar_svhn.normalization_stats(np.zeros((1,) + shapes.image_shape, np.uint8), config.normalization))
    variables = eval_variables(state)
    u8, i32 = jnp.uint8, jnp.int32
    if shapes.host_fed:
        chunk, split = (config.steps_per_call, config.batch_size), NamedSharding(mesh, HOST_BATCH_SPEC["images"])
        host = {"images": jax.ShapeDtypeStruct(chunk + shapes.image_shape, u8, sharding=split),
                "labels": jax.ShapeDtypeStruct(chunk, i32, sharding=split), "mean": mean, "std": std}
        batch = NamedSharding(mesh, PartitionSpec(parallel.AXIS))
        eval_batch = config.eval_batch_size
        return plan, [
            ("train", make_host_train_steps(plan, config), (state, host, keys, 1)),
            ("eval", make_batch_errors(config, plan.model, mesh),
             (variables, jax.ShapeDtypeStruct((eval_batch,) + shapes.image_shape, u8, sharding=batch),
              jax.ShapeDtypeStruct((eval_batch,), i32, sharding=batch), mean, std)),
        ]
    train_data = {"images": jax.ShapeDtypeStruct((shapes.num_train,) + shapes.image_shape, u8, sharding=replicated),
                  "labels": jax.ShapeDtypeStruct((shapes.num_train,), i32, sharding=replicated),
                  "mean": mean, "std": std}
    permutation = jax.ShapeDtypeStruct((plan.steps_per_epoch * config.batch_size,), i32, sharding=replicated)
    batches = -(-max(shapes.num_val, shapes.num_test) // config.eval_batch_size)
    split_sharding = NamedSharding(mesh, PartitionSpec(None, parallel.AXIS))
    split = {"images": jax.ShapeDtypeStruct((batches, config.eval_batch_size) + shapes.image_shape, u8,
                                            sharding=split_sharding),
             "labels": jax.ShapeDtypeStruct((batches, config.eval_batch_size), i32, sharding=split_sharding)}
    return plan, [
        ("train", make_train_steps(plan, config), (state, train_data, keys, permutation, 0, 1)),
        ("eval", make_count_errors(config, plan.model, mesh), (variables, split, mean, std)),
    ]


def devices_needed(report: dict):
    """A lower bound on the devices the run needs: the smallest count offered for the target that
    divides the batch and holds the whole program's memory spread evenly (per-device memory never
    shrinks faster than that: parameters and optimiser state are replicated). Compile there to know."""
    target = targets.target(report["target"])
    counts = sorted(target.shapes) if target.platform == "tpu" else [2**k for k in range(10)]
    scale = report["peak_memory"] * report["devices"] / report["usable_memory"]
    return next((n for n in counts if n >= scale and report["batch_size"] % n == 0), None)


def estimated_flops(plan, shapes: DataShapes, batch_per_device: int) -> dict:
    """The multiply-add estimate of one training step per device: forward multiply-adds (convolutions
    and classifier) x 2 FLOPs x 3 (forward, input and weight gradients), at constant depth and
    with each block weighted by its survival probability."""
    side = shapes.image_shape[0]
    costs, fixed = plan.model.block_macs(side)
    per_image = {"constant": fixed + costs.sum(), "expected": fixed + plan.model.survival_probabilities() @ costs}
    return {k: float(6 * v * batch_per_device) for k, v in per_image.items()}


def analyse(config, target_name: str, num_devices: int, cuda_version: str, project_options: bool,
            dump_to: str = "", xla_options=None) -> dict:
    """Compile the run of `config` for `num_devices` devices of the target and report (see module
    doc); `xla_options` are added to both compilations (trying an XLA or libtpu option)."""
    import jax

    from sd_jax.data import cifar_svhn

    from sd_jax.training import compiler
    from sd_jax.config import resolve_convention, resolve_platform_defaults, validate

    target = targets.target(target_name)
    devices = target.devices(num_devices, cuda_version) if target.platform == "gpu" else target.devices(num_devices)
    validate(config, cifar_svhn.DATASETS, num_devices)
    resolve_convention(config)
    resolve_platform_defaults(config, target.platform)
    shapes = data_shapes(config)
    options = contextlib.nullcontext() if project_options else compiler.without_options()
    with options:
        plan, calls = training_calls(config, devices, shapes)
        report = {"target": target_name, "device_kind": devices[0].device_kind, "platform": target.platform,
                  "devices": num_devices, "target_source": target.source, "jax": jax.__version__,
                  "compiler_options": compiler.compiler_options(devices[0]),
                  "model": config.model, "depth": config.depth, "p_last": config.p_last,
                  "survival_mode": config.survival_mode, "drop_mode": config.drop_mode, "dtype": config.dtype,
                  "scan_blocks": config.scan_blocks, "batch_size": config.batch_size,
                  "xla_options": dict(xla_options or {}),
                  "device_memory": target.memory,
                  "usable_memory": int(target.memory * (GPU_MEMORY_POOL if target.platform == "gpu" else 1.0)),
                  "calls": {}}
    if target.platform == "gpu":
        report["cuda_version"] = cuda_version
    with contextlib.ExitStack() as stack:
        dump_root = dump_to or stack.enter_context(tempfile.TemporaryDirectory(prefix="sd_jax_aot_"))
        for name, function, args in calls:
            report["calls"][name] = compile_call(name, function, args, os.path.join(dump_root, name), target_name,
                                                 config, plan, shapes, num_devices, xla_options)
    report["peak_memory"] = max(call["memory"]["total"] for call in report["calls"].values())
    report["fits"] = report["peak_memory"] <= report["usable_memory"]
    report["devices_needed"] = None if report["fits"] else devices_needed(report)
    return report


def compile_call(name, function, args, dump_dir, target_name, config, plan, shapes, num_devices,
                 xla_options) -> dict:
    """Lower and compile one call for the target; what the report says of it (see `analyse`)."""
    target = targets.target(target_name)
    start = time.perf_counter()
    lowered = function.lower(*args)
    extra = dict(xla_options or {}, **({"xla_dump_to": dump_dir} if target.platform == "gpu" else {}))
    try:
        compiled = lowered.compile(extra or None)
    except Exception as error:  # noqa: BLE001 - XLA raises JaxRuntimeError; only running out of HBM is a result
        needed = out_of_memory(error)
        if needed is None:
            raise
        return {"compile_s": round(time.perf_counter() - start, 2), "memory": {"total": needed},
                "out_of_memory": str(error).splitlines()[0]}
    result = {"compile_s": round(time.perf_counter() - start, 2), "memory": memory(compiled),
              "conditionals": count_conditionals(compiled.as_text())}
    if name == "train":  # XLA counts a loop body once: scanned blocks would be counted once per stage
        result["xla_flops_per_step"] = None if config.scan_blocks else xla_flops(lowered, compiled)
        result["estimated_flops_per_step"] = estimated_flops(plan, shapes, config.batch_size // num_devices)
        estimate = estimate_step(compiled.as_text(), targets.chip(target_name),
                                 [float(p) for p in plan.model.survival_probabilities()])
        result["step_estimate"] = dict(estimate, seconds_per_epoch=estimate["seconds"] * plan.steps_per_epoch)
    if target.platform == "gpu":  # the training call's loop runs once per step, evaluation's once per batch
        per = "per_step" if name == "train" else "per_batch"
        result["thunks"], result[f"host_round_trips_{per}"] = gpu_thunks(dump_dir) or (None, None)
    return result


def gib(n) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_report(report: dict) -> str:
    """The report as a few lines of text for a person."""
    lines = [f"{report['model']} depth {report['depth']}, p_L {report['p_last']} ({report['survival_mode']}), "
             f"{report['dtype']}, batch {report['batch_size']}, scan_blocks={report['scan_blocks']}: "
             f"{report['devices']} x {report['device_kind']} ({report['target']}, compile only, JAX {report['jax']})"]
    if report.get("cuda_version"):
        lines.append(f"  described with CUDA driver/runtime {report['cuda_version']}")
    lines.append(f"  the project's compiler options: {report['compiler_options'] or 'none'}"
                 + (f"; added: {report['xla_options']}" if report["xla_options"] else ""))
    for name, call in report["calls"].items():
        if "out_of_memory" in call:
            lines.append(f"  {name}: the compiler refused it after {call['compile_s']:.1f} s: {call['out_of_memory']}")
            continue
        m = call["memory"]
        lines.append(f"  {name}: compiled in {call['compile_s']:.1f} s; memory per device {gib(m['total'])} "
                     f"(arguments {gib(m['arguments'])}, outputs {gib(m['outputs'])}, aliased {gib(m['aliased'])}, "
                     f"temporaries {gib(m['temporaries'])}); {call['conditionals']} conditionals")
        if "xla_flops_per_step" in call:
            est = call["estimated_flops_per_step"]
            flops = call["xla_flops_per_step"]
            lines.append(f"    FLOPs per step and device: XLA {flops / 1e9:.1f} G" if flops else
                         "    FLOPs per step and device: none from XLA (with scan_blocks it counts each "
                         "stage's loop body once)" if report["scan_blocks"] else
                         "    FLOPs per step and device: XLA gave none")
            lines[-1] += (f"; multiply-add estimate {est['constant'] / 1e9:.1f} G at constant depth, "
                          f"{est['expected'] / 1e9:.1f} G expected with the drops")
        if "step_estimate" in call:
            lines.append("    " + format_estimate(call["step_estimate"]))
        if call.get("thunks"):
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(call["thunks"].items(), key=lambda kv: -kv[1]))
            lines.append(f"    thunks: {kinds}")
            key = next(k for k in call if k.startswith("host_round_trips_per_"))
            unit = "step" if key.endswith("step") else "evaluated batch"
            lines.append(f"    host round trips per {unit}: {call[key]}")
    peak, usable = report["peak_memory"], report["usable_memory"]
    pool = " (JAX's default pool: 75% of the GPU)" if report["platform"] == "gpu" else ""
    if report["fits"]:
        lines.append(f"  fits: {gib(peak)} of {gib(usable)} usable{pool}, {gib(report['device_memory'])} on the chip")
    else:
        more = (f"at least {report['devices_needed']} devices (compile with --devices {report['devices_needed']} "
                "or more to know)" if report["devices_needed"] else "more devices")
        lines.append(f"  DOES NOT FIT: {gib(peak)} needed, {gib(usable)} usable{pool}: over by {gib(peak - usable)}; "
                     f"lower batch_size, use dtype=bfloat16 or {more}")
    return "\n".join(lines)


def format_estimate(estimate: dict) -> str:
    """The step-time lower bound (sd_jax.training.step_estimate) in one line."""
    text = (f"step time, a lower bound: {estimate['seconds'] * 1e3:.3f} ms per step, "
            f"{estimate['seconds_per_epoch']:.2f} s per epoch (peak FLOP/s and bandwidth, per-kernel launch cost); "
            f"expected per step {estimate['kernels']:.0f} kernels, {estimate['bytes'] / 1e9:.2f} GB moved, "
            f"{estimate['flops'] / 1e9:.1f} GFLOP")
    if estimate["conditionals"]:
        opened, closed = estimate["open_gate"], estimate["closed_gate"]
        text += (f"; a gate (its forward and backward conditionals) open {opened['kernels']:.1f} kernels, "
                 f"{opened['bytes'] / 1e6:.1f} MB, closed {closed['kernels']:.1f} kernels, {closed['bytes'] / 1e6:.1f} MB")
        if not estimate["gates_paired_with_blocks"]:
            text += " (each conditional weighted by the mean survival probability)"
    return text


RATIO_KEYS = (("expected kernels per step", lambda r: r["calls"]["train"]["step_estimate"]["kernels"]),
              ("bytes moved per step", lambda r: r["calls"]["train"]["step_estimate"]["bytes"]),
              ("step time lower bound", lambda r: r["calls"]["train"]["step_estimate"]["seconds"]),
              ("memory per device", lambda r: r["peak_memory"]),
              ("compile time of the training call", lambda r: r["calls"]["train"]["compile_s"]))


def format_comparison(report: dict, twin: dict) -> str:
    """The report, its constant-depth twin's, and the ratios stochastic / constant."""
    lines = [format_report(report), "constant-depth twin (p_L 1.0):", format_report(twin), "stochastic / constant:"]
    for name, value in RATIO_KEYS:
        with contextlib.suppress(KeyError, TypeError, ZeroDivisionError):
            lines.append(f"  {name}: {value(report) / value(twin):.3f}")
    return "\n".join(lines)


def arg_parser():
    p = cli.parser(__doc__, config=True)
    p.add_argument("--target", required=True, help=f"one of {', '.join(targets.TARGETS)}")
    p.add_argument("--devices", type=int, default=1, help="devices of the data mesh (GPUs on one host, TPU chips)")
    p.add_argument("--compiler-options", default="project", choices=("project", "none"),
                   help="compile with the project's XLA options (sd_jax/training/compiler.py) or XLA's defaults")
    p.add_argument("--xla-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an XLA (or libtpu) option added to both compilations; repeat for several")
    p.add_argument("--cuda-version", default=targets.CUDA_VERSION,
                   help="CUDA driver and runtime version the GPU is described with; below 12.3 XLA keeps "
                        "conditionals and loops out of CUDA graphs")
    p.add_argument("--dump-to", default="", help="keep XLA's dump of each call (HLO, GPU thunk sequence) here")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--compare-constant", action="store_true",
                   help="also compile the config's constant-depth twin (p_last=1.0) and print the ratios")
    p.add_argument(WORKER_FLAG, dest="worker_output", help=argparse.SUPPRESS)
    return p


def run_worker(args) -> None:
    """In the child process: compile and write the report as JSON to the worker output file."""
    options = dict(option.split("=", 1) for option in args.xla_option)
    analysed = lambda config, dump_to: analyse(config, args.target, args.devices, args.cuda_version,
                                               args.compiler_options == "project", dump_to, options)
    report = analysed(args.config.copy_and_resolve_references(), args.dump_to)
    if args.compare_constant:
        twin = args.config.copy_and_resolve_references()
        twin.p_last = 1.0
        report["constant_twin"] = analysed(twin, os.path.join(args.dump_to, "constant") if args.dump_to else "")
    with open(args.worker_output, "w") as f:
        json.dump(report, f)


def compile_in_child(argv) -> dict:
    """Run the compilation in a child process (a compiler that crashes takes only the child with
    it): the report, or an AotFailure naming the signal or the child's last error lines."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        # No accelerator is used; and no persistent compilation cache: a compile-only client cannot load a
        # cached program back (JAX warns, then compiles again), so entries for it would only fill the cache.
        env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", JAX_ENABLE_COMPILATION_CACHE="false")
        child = subprocess.run([sys.executable, "-m", "sd_jax.aot", *argv, WORKER_FLAG, out], env=env,
                               stderr=subprocess.PIPE, text=True)
        if child.returncode == 0 and os.path.exists(out):
            with open(out) as f:
                return json.load(f)
        errors = [line for line in child.stderr.splitlines() if line.startswith("error:")]
        if errors:
            raise AotInputError(errors[-1].removeprefix("error: "))
        tail = "\n".join(child.stderr.strip().splitlines()[-8:])
        how = (f"was killed by {signal.Signals(-child.returncode).name}" if child.returncode < 0
               else f"exited with {child.returncode}")
        raise AotFailure(f"the compiler {how}:\n{tail}")


class AotInputError(ValueError):
    """A target, device count or config that cannot be compiled for; the message says why."""


class AotFailure(RuntimeError):
    """The compilation failed or crashed; the message names how and the compiler's last words."""


def run(args, argv):
    if args.worker_output:
        return run_worker(args)
    targets.target(args.target)  # an unknown target or option fails here, before the child starts
    bad = [option for option in args.xla_option if "=" not in option]
    if bad:
        raise AotInputError(f"--xla-option {bad[0]!r} must be KEY=VALUE")
    report = compile_in_child(argv)
    print(json.dumps(report) if args.json else format_comparison(report, report["constant_twin"])
          if "constant_twin" in report else format_report(report))
    return report


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = ((targets.TargetError, cli.EXIT_BAD_INPUT), (AotInputError, cli.EXIT_BAD_INPUT),
             (AotFailure, cli.EXIT_FAILED))
    return cli.main(arg_parser(), lambda args: run(args, argv), argv, extra_exit_codes=extra)


if __name__ == "__main__":
    main()
