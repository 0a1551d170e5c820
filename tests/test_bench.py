import json
import os

import pytest

from sd_jax import bench, compiler

FIELDS = {"framework", "config", "depth", "p_last", "mode", "compile_s", "step_s_median", "images_per_s",
          "device_kind", "batch_size", "dtype"}


def run_bench(capsys, *extra):
    bench.main(["--depth", "8", "--batch-size", "8", "--steps", "1", "--rounds", "2", *extra])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_bench_reports_each_configuration_and_a_summary(capsys):
    rows = run_bench(capsys, "--scan-blocks")
    *configs, summary = rows
    assert [r["config"] for r in configs] == ["constant", "stochastic", "floor"]
    for row in configs:
        assert FIELDS <= set(row)
        assert row["step_s_median"] > 0 and row["images_per_s"] == pytest.approx(8 / row["step_s_median"])
    assert summary["sd_over_constant"] == pytest.approx(configs[1]["step_s_median"] / configs[0]["step_s_median"])
    assert summary["expected_ratio"] == pytest.approx(bench.expected_step_ratio(8, 0.5, "linear"))
    assert summary["compiler_options"] == compiler.compiler_options()


def test_expected_ratio_from_block_costs():
    costs, fixed = bench.block_costs(110)
    assert len(costs) == 54
    # Every non-transition block costs the same: channels double as the resolution halves.
    assert costs[0] == costs[17] == costs[20] == costs[53] == 9 * 32 * 32 * 16 * 32
    ratio = bench.expected_step_ratio(110, 0.5, "linear")
    assert 40.25 / 54 < ratio < 0.76  # the stem always runs, transitions cost less
    assert bench.expected_step_ratio(110, 1.0, "linear") == 1.0


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


def test_bench_times_with_and_without_the_project_compiler_options(capsys):
    rows = run_bench(capsys, "--compiler-options", "both", "--configs", "constant")
    *configs, summary = rows
    assert [r["framework"] for r in configs] == ["jax", "jax-no-options"]
    assert summary["options_speedup_constant"] == pytest.approx(
        configs[1]["step_s_median"] / configs[0]["step_s_median"])
    assert compiler.compiler_options() == summary["compiler_options"]  # restored after the "none" build


def test_bench_times_with_and_without_the_partial_batch_mask(capsys):
    rows = run_bench(capsys, "--batch-mask", "both", "--configs", "constant")
    *configs, summary = rows
    assert [r["framework"] for r in configs] == ["jax", "jax-no-mask"]
    assert summary["batch_mask"] == "both"
    assert summary["mask_cost_constant"] == pytest.approx(configs[0]["step_s_median"] / configs[1]["step_s_median"])
