"""Deviceless compilation (sd_jax.aot): the thunk reader, conditionals in the compiled training
call, and compiling for a GPU or TPU that is not attached (skipped where its compiler, the
"aot-gpu" / "aot-tpu" extra, is not installed)."""
import dataclasses
import importlib.util
import subprocess
import sys
import textwrap

import jax
import pytest

from sd_jax import aot, targets

from sd_jax.training import compiled
from sd_jax.config import load_config

GPU_COMPILER = any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)) \
    if importlib.util.find_spec("jax_plugins") else False
TPU_COMPILER = importlib.util.find_spec("libtpu") is not None
pytestmark = pytest.mark.usefixtures("compile_only_targets")
NEEDS_GPU_COMPILER = pytest.mark.skipif(not GPU_COMPILER, reason='JAX\'s CUDA plugin is not installed: pip install ".[aot-gpu]"')
NEEDS_TPU_COMPILER = pytest.mark.skipif(not TPU_COMPILER, reason='libtpu is not installed: pip install ".[aot-tpu]"')

# The shape of XLA:GPU's thunk sequence dump (module.thunk_sequence_after_thunk_passes.txt): a loop
# with a conditional in its body outside any command buffer, then a command buffer holding another.
SEQUENCE = """\
001: kCopy         [source       | next=002 (1)] kCopy
002: kWhile        [prev=001 (1) | sink        ]
condition:
    003: kCustomKernel [source | sink] wrapped_compare grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
  body:
    006: kConditional  [source       | sink        ]
      false_branch:
        004: kConvolution [source | sink] kConvolution
      true_branch:
        005: kCopy [source | sink] kCopy
000: kCommandBuffer [source | sink]
    008: kConditional  [source | sink]
      false_branch:
        007: kCopy [source | sink] kCopy
"""


def test_thunk_counts_read_the_nesting_of_command_buffers():
    kinds, host_round_trips = compiled.thunk_counts(SEQUENCE)
    assert kinds == {"kCopy": 3, "kWhile": 1, "kCustomKernel": 1, "kConditional": 2, "kConvolution": 1,
                     "kCommandBuffer": 1}
    assert host_round_trips == 2  # the loop and its conditional; the one inside the command buffer runs on the device


def small_config(**overrides):
    config = load_config("quickstart")
    config.update({"dataset": "cifar10", "depth": 8, "batch_size": 16, "eval_batch_size": 1000, **overrides})
    return config


def test_imagenet_projection_blocks_kept_on_have_no_gate():
    """ResNet-50's 16 blocks without the 4 projection blocks' gates (drop_downsample_blocks=False):
    12 conditionals in the traced forward pass (not counting the choice by platform of how the
    gates are computed, `lax.platform_dependent`, which lowering resolves)."""
    from sd_jax.models.imagenet import ResNetImageNet

    def conditionals(**kwargs):
        model = ResNetImageNet(depth=50, num_classes=10, p_last=0.8, **kwargs)
        x = jax.ShapeDtypeStruct((2, 32, 32, 3), jax.numpy.float32)
        variables = jax.eval_shape(model.init, jax.random.key(0), x)
        apply = lambda v, x: model.apply(v, x, train=True, rngs={"drop": jax.random.key(1)},  # noqa: E731
                                         mutable=["batch_stats", "gates"])
        text = str(jax.make_jaxpr(apply)(variables, x))
        return text.count(" cond[") - text.count("branches_platforms=")

    assert conditionals(drop_downsample_blocks=True) == 16
    assert conditionals(drop_downsample_blocks=False) == 12


def test_data_shapes_match_the_loaded_bundled_dataset_and_the_paper_splits():
    cifar = aot.data_shapes(small_config())
    assert (cifar.num_train, cifar.num_val, cifar.num_test, cifar.image_shape) == (45000, 5000, 10000, (32, 32, 3))
    svhn = aot.data_shapes(small_config(dataset="svhn"))
    assert svhn.num_train + svhn.num_val == 73257 + 531131 and svhn.num_val == 10 * (400 + 200)


def test_an_unknown_target_is_a_clear_error_and_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        aot.main(["--config", "quickstart", "--target", "h101"])
    assert exit_info.value.code == 2
    assert "unknown target 'h101'; choose one of h100" in capsys.readouterr().err


def test_a_missing_compiler_says_which_extra_to_install(monkeypatch):
    from jax.experimental import topologies

    def no_plugin(*args, **kwargs):
        raise NotImplementedError("topology not implemented for cuda")

    monkeypatch.setattr(topologies, "get_topology_desc", no_plugin)
    with pytest.raises(targets.TargetError, match=r'pip install "sd_jax\[aot-gpu\]"'):
        targets.target("h100").devices(1)


def test_a_compiler_crash_is_reported_with_exit_code_3(tmp_path):
    """The compilation runs in a child process: one that dies of a signal (here the config file
    kills it, as libtpu's compiler once did) becomes an error line and exit code 3. The child keeps
    out of JAX's persistent compilation cache (it says so before it dies), even where one is set."""
    config_file = tmp_path / "crash.py"
    config_file.write_text(textwrap.dedent("""\
        import os, signal, sys
        from sd_jax.config import default_config

        def get_config():
            if "--worker-output" in sys.argv:
                import jax
                print("persistent cache:", jax.config.jax_enable_compilation_cache, file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGSEGV)
            return default_config()
        """))
    result = subprocess.run([sys.executable, "-m", "sd_jax.aot", "--config", str(config_file), "--target", "h100"],
                            capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert "error: the compiler was killed by SIGSEGV" in result.stderr
    assert "persistent cache: False" in result.stderr


@pytest.mark.slow  # deviceless compilations: left to the full run
@NEEDS_GPU_COMPILER
def test_gpu_conditionals_and_the_step_loop_run_inside_one_command_buffer():
    """H100, depth 8 at p_L 0.5: with the project's options no conditional or loop waits for the
    host; with XLA's defaults each of the 6 conditionals and the step loop does."""
    report = aot.analyse(small_config(p_last=0.5), "h100", 1, targets.CUDA_VERSION, project_options=True)
    train = report["calls"]["train"]
    assert train["conditionals"] == 6 and train["thunks"]["kConditional"] == 6
    assert train["host_round_trips_per_step"] == 0 and train["thunks"]["kCommandBuffer"] >= 1
    assert_estimate_counts_the_models_work(train, conditionals=6)
    assert_a_closed_gate_costs_a_fraction_of_an_open_one(train["step_estimate"])
    default = aot.analyse(small_config(p_last=0.5), "h100", 1, targets.CUDA_VERSION, project_options=False)
    assert default["calls"]["train"]["host_round_trips_per_step"] == 6 + 1
    assert report["fits"] and report["usable_memory"] == int(0.75 * targets.TARGETS["h100"].memory)


def assert_estimate_counts_the_models_work(train: dict, conditionals: int) -> None:
    """The step estimate's FLOPs, read from the compiled program's convolutions with each gate
    weighted by its block's survival probability, against the multiply-adds counted from the model's
    shapes (forward, input and weight gradients: the stem's input gradient is not computed, hence
    the tolerance); its kernels against the program's, every branch counted. A TPU computes some
    convolutions on padded tiles: there the count lies between the model's and XLA's own (libtpu's
    cost analysis, every gate open)."""
    estimate = train["step_estimate"]
    assert estimate["conditionals"] == conditionals and estimate["gates_paired_with_blocks"] == (conditionals > 0)
    expected = train["estimated_flops_per_step"]["expected"]
    if "thunks" in train:
        assert estimate["flops"] == pytest.approx(expected, rel=0.05)
    else:
        assert 0.95 * expected <= estimate["flops"] <= train["xla_flops_per_step"]
    assert 0 < estimate["seconds"] and estimate["seconds_per_epoch"] > estimate["seconds"]
    if "thunks" in train:
        kernels = sum(n for kind, n in train["thunks"].items() if kind not in ("kConditional", "kWhile", "kCommandBuffer"))
        assert estimate["kernels"] <= kernels


def assert_a_closed_gate_costs_a_fraction_of_an_open_one(estimate: dict) -> None:
    """A closed gate (its forward and backward conditionals' closed branches) writes the block's
    output and the zeros the step reads, its BatchNorm statistics being chosen outside: at most a
    quarter of an open gate's kernels and bytes (issue 33's target). Differentiating `nn.cond`
    gave 0.96 and 0.51 (docs/performance.md)."""
    opened, closed = estimate["open_gate"], estimate["closed_gate"]
    assert closed["kernels"] <= opened["kernels"] / 4 and closed["bytes"] <= opened["bytes"] / 4
    assert closed["flops"] == 0 and opened["flops"] > 0


@pytest.mark.slow  # deviceless compilations: left to the full run
@NEEDS_GPU_COMPILER
def test_constant_depth_compiles_without_a_conditional_for_a_gpu():
    report = aot.analyse(small_config(p_last=1.0), "h100", 1, targets.CUDA_VERSION, project_options=True)
    train = report["calls"]["train"]
    assert train["conditionals"] == 0 and "kConditional" not in train["thunks"]
    assert train["host_round_trips_per_step"] == 0
    assert_estimate_counts_the_models_work(train, conditionals=0)


@pytest.mark.slow  # deviceless compilations: left to the full run
@NEEDS_GPU_COMPILER
def test_on_several_gpus_the_gates_stay_in_the_graph_with_their_all_reduces():
    """Two H100s: synchronised BatchNorm puts an all-reduce inside every gate; with COLLECTIVES
    among the command-buffer types the gates still run on the device."""
    report = aot.analyse(small_config(p_last=0.5), "h100", 2, targets.CUDA_VERSION, project_options=True)
    train = report["calls"]["train"]
    assert train["thunks"].get("kAllReduce", 0) > 0 and train["conditionals"] == 6
    assert train["host_round_trips_per_step"] == 0


@pytest.mark.slow  # deviceless compilations: left to the full run
@NEEDS_GPU_COMPILER
def test_gpu_described_with_an_old_cuda_keeps_conditionals_on_the_host():
    """XLA drops the CONDITIONAL and WHILE command-buffer types below CUDA 12.3 (what a user with
    an old driver gets): the gates wait for the host again."""
    report = aot.analyse(small_config(p_last=0.5), "h100", 1, "12.2.0", project_options=True)
    assert report["calls"]["train"]["host_round_trips_per_step"] == 6 + 1


@pytest.mark.slow
@NEEDS_TPU_COMPILER
def test_tpu_compiles_the_training_call_and_says_when_it_does_not_fit(monkeypatch):
    """Four v5e chips (their memory shrunk to 1 MiB for the verdict): the TPU keeps the 6
    conditionals (it runs them on the device), XLA counts the step's FLOPs, and the report says the
    run does not fit and by how much."""
    monkeypatch.setitem(targets.TARGETS, "v5e", dataclasses.replace(targets.TARGETS["v5e"], memory=2**20))
    report = aot.analyse(small_config(p_last=0.5, scan_blocks=False), "v5e", 4, targets.CUDA_VERSION,
                         project_options=True)
    train = report["calls"]["train"]
    assert report["devices"] == 4 and report["device_kind"].startswith("TPU v5")
    assert train["conditionals"] == 6
    assert train["xla_flops_per_step"] > 0 and train["memory"]["total"] > 2**20
    assert_estimate_counts_the_models_work(train, conditionals=6)
    assert not report["fits"]
    text = aot.format_report(report)
    assert "DOES NOT FIT" in text and "over by" in text
    assert report["devices_needed"] is None and text.endswith("or more devices")  # no v5e slice holds 0.67 GiB in 1 MiB chips


def test_a_tpu_program_that_cannot_fit_is_a_verdict_with_the_devices_it_needs():
    """libtpu refuses to compile a program whose temporaries exceed the chip's memory: the report
    takes the bytes it needed from the error and names the smallest slice that could hold it."""
    error = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                         "temporaries (30.19G) exceeds available HBM (15.75G).")
    assert compiled.out_of_memory(error) == int(30.19 * 2**30)
    assert compiled.out_of_memory(RuntimeError("INTERNAL: something else")) is None
    report = {"target": "v5e", "devices": 1, "batch_size": 1024, "peak_memory": int(30.19 * 2**30),
              "usable_memory": targets.TARGETS["v5e"].memory}
    assert aot.devices_needed(report) == 4  # 30.2 GiB over 16 GiB chips needs at least 2; v5e slices: 1, 4, 8, ...
