import json
import os

import pytest

from sd_jax import bench

from sd_jax.training import compiler
from sd_jax.models.cifar import ResNetCIFAR
from sd_jax.models.imagenet import ResNetImageNet

FIELDS = {"framework", "config", "depth", "p_last", "mode", "compile_s", "step_s_median", "images_per_s",
          "device_kind", "batch_size", "dtype"}


def run_bench(capsys, *extra):
    bench.main(["--depth", "8", "--batch-size", "8", "--steps", "1", "--rounds", "2", *extra])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.slow
def test_bench_reports_each_configuration_and_a_summary(capsys):
    rows = run_bench(capsys, "--scan-blocks")
    *configs, summary = rows
    assert [r["config"] for r in configs] == ["constant", "stochastic", "floor"]
    for row in configs:
        assert FIELDS <= set(row)
        assert row["step_s_median"] > 0 and row["images_per_s"] == pytest.approx(8 / row["step_s_median"])
    assert summary["sd_over_constant"] == pytest.approx(configs[1]["step_s_median"] / configs[0]["step_s_median"])
    assert summary["expected_ratio"] == pytest.approx(bench.expected_step_ratio(ResNetCIFAR(8, p_last=0.5)))
    assert summary["compiler_options"] == compiler.compiler_options()


def test_expected_ratio_from_block_costs():
    costs, fixed = ResNetCIFAR(110).block_macs()
    assert len(costs) == 54
    # Every non-transition block costs the same: channels double as the resolution halves.
    assert costs[0] == costs[17] == costs[20] == costs[53] == 9 * 32 * 32 * 16 * 32
    assert fixed == 9 * 32 * 32 * 3 * 16 + 64 * 10
    ratio = bench.expected_step_ratio(ResNetCIFAR(110, p_last=0.5))
    assert 40.25 / 54 < ratio < 0.76  # the stem always runs, transitions cost less
    assert bench.expected_step_ratio(ResNetCIFAR(110, p_last=1.0)) == 1.0


@pytest.mark.parametrize("depth,p_last,gmacs,expected", [(50, 0.8, 4.09, 0.905), (101, 0.6, 7.80, 0.806),
                                                         (152, 0.5, 11.51, 0.755)])
def test_bottleneck_costs_match_the_published_multiply_adds(depth, p_last, gmacs, expected):
    # torchvision lists 4.09 / 7.80 / 11.51 GFLOPS (multiply-adds) at 224 px; the expected
    # step ratios of composer's and the paper's settings were derived by hand from the layer shapes.
    model = ResNetImageNet(depth, p_last=p_last)
    costs, fixed = model.block_macs(224)
    assert (costs.sum() + fixed) / 1e9 == pytest.approx(gmacs, abs=0.005)
    assert bench.expected_step_ratio(model, 224) == pytest.approx(expected, abs=5e-4)
    # The first block of stage 2 at 224 px: 1x1 256->128 at 56 px, 3x3 128->128 and 1x1 128->512 at 28 px.
    assert costs[3] == 56 * 56 * 256 * 128 + 28 * 28 * (9 * 128 * 128 + 128 * 512)
    kept = ResNetImageNet(depth, p_last=p_last, drop_downsample_blocks=False)
    assert bench.expected_step_ratio(kept, 224) > bench.expected_step_ratio(model, 224)


@pytest.mark.slow
def test_bench_times_the_bottleneck_model_unrolled_and_scanned(capsys):
    bench.main(["--model", "resnet_imagenet", "--image-size", "32", "--batch-size", "2", "--steps", "1",
                "--rounds", "1", "--configs", "stochastic", "--scan-blocks", "both"])
    *rows, summary = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["framework"], r["config"]) for r in rows] == [("jax", "stochastic"), ("jax-scanned", "stochastic")]
    assert {r["depth"] for r in rows} == {50} and rows[0]["p_last"] == summary["p_last"] == 0.8
    assert summary["expected_ratio"] == pytest.approx(bench.expected_step_ratio(ResNetImageNet(50, p_last=0.8), 32))
    assert summary["compile_unrolled_over_scanned_stochastic"] == pytest.approx(
        rows[0]["compile_s"] / rows[1]["compile_s"])
    assert summary["scanned_over_unrolled_stochastic"] == pytest.approx(
        rows[1]["step_s_median"] / rows[0]["step_s_median"])


@pytest.mark.parametrize("argv,message", [(["--model", "resnet_imagenet", "--depth", "34"], "depth must be one of"),
                                          (["--depth", "51"], "6n+2"), (["--p-last", "0"], "(0, 1]"),
                                          (["--model", "resnet_imagenet", "--peer", "torch"], "CIFAR network")])
def test_bench_rejects_what_the_model_lacks(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bench_with_torch_peer(capsys):
    pytest.importorskip("torch", reason="PyTorch is not installed")
    if not os.path.exists(bench.PEER_PATH):
        pytest.skip(f"peer {bench.PEER_PATH} not found")
    rows = run_bench(capsys, "--peer", "torch", "--peer-channels-last", "--configs", "constant,stochastic")
    assert [(r["framework"], r["config"]) for r in rows[:-1]] == [
        ("jax", "constant"), ("torch", "constant"), ("jax", "stochastic"), ("torch", "stochastic")]
    summary = rows[-1]
    assert summary["peer_channels_last"] is True
    assert summary["speedup_vs_peer"] == pytest.approx(rows[3]["step_s_median"] / rows[2]["step_s_median"])


@pytest.mark.slow
def test_bench_times_with_and_without_the_project_compiler_options(capsys):
    rows = run_bench(capsys, "--compiler-options", "both", "--configs", "constant")
    *configs, summary = rows
    assert [r["framework"] for r in configs] == ["jax", "jax-no-options"]
    assert summary["options_speedup_constant"] == pytest.approx(
        configs[1]["step_s_median"] / configs[0]["step_s_median"])
    assert compiler.compiler_options() == summary["compiler_options"]  # restored after the "none" build


@pytest.mark.slow
def test_bench_times_with_and_without_the_partial_batch_mask(capsys):
    rows = run_bench(capsys, "--batch-mask", "both", "--configs", "constant")
    *configs, summary = rows
    assert [r["framework"] for r in configs] == ["jax", "jax-no-mask"]
    assert summary["batch_mask"] == "both"
    assert summary["mask_cost_constant"] == pytest.approx(configs[0]["step_s_median"] / configs[1]["step_s_median"])
