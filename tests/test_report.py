import json
import os
import re
import subprocess
import sys

import jax
import pytest

from sd_jax import report

from sd_jax.training import records
from sd_jax.config import load_config, resolve_convention, resolve_platform_defaults
from sd_jax.models.cifar import ResNetCIFAR
from sd_jax.training.loop import train_and_evaluate
from tests import notebooks
from tests.conftest import ROOT
from tests.test_training import tiny_config


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    workdirs = []
    for name, p_last in (("constant", 1.0), ("stochastic", 0.5)):
        workdir = str(root / name)
        train_and_evaluate(tiny_config(dataset="digits", p_last=p_last, num_epochs=4), workdir)
        workdirs.append(workdir)
    return workdirs


@pytest.mark.slow
def test_report_files_and_table_numbers(two_runs, tmp_path):
    out = str(tmp_path / "report")
    table = report.write_report(two_runs, out)
    for name in ("figure3.png", "training_time.png", "table.md"):
        assert os.path.getsize(os.path.join(out, name)) > 1000 or name == "table.md"
    assert open(os.path.join(out, "table.md")).read() == table
    rows = [line for line in table.splitlines() if line.startswith("| constant") or line.startswith("| stochastic")]
    assert len(rows) == 2
    for row, workdir in zip(rows, two_runs):
        cells = [c.strip() for c in row.strip("|").split("|")]
        summary = records.read_json(workdir, records.SUMMARY_FILE)
        metrics = records.read_metrics(workdir)
        val = [m["val_error"] for m in metrics]
        best_epoch = max(m["epoch"] for m in metrics if m["val_error"] == min(val))  # ties: the later epoch
        assert int(cells[7]) == summary["best_val_epoch"] == best_epoch
        assert float(cells[6]) == pytest.approx(summary["test_error_at_best_val"], abs=0.005)
        assert float(cells[8]) == pytest.approx(summary["final_test_error"], abs=0.005)
        assert cells[1] == "digits" and cells[4] == ("constant" if "constant" in workdir else "linear")
    ratio = re.search(r"([0-9.]+) x constant depth \(mean epoch time\), expected ([0-9.]+)", table)
    assert ratio and float(ratio.group(2)) == pytest.approx(report.expected_step_ratio(ResNetCIFAR(8, p_last=0.5)), abs=5e-4)


def test_figure3_draws_test_error_and_training_loss_with_the_best_epoch_in_the_legend(two_runs, tmp_path):
    runs = [report.load_run(w) for w in two_runs]
    panels = report.plot_figure3(runs, str(tmp_path / "figure3.png"))
    assert panels["error"][0] == "test error (%)" and panels["loss"][0] == "training loss"
    for run, text in zip(runs, panels["error"][1]):
        best = min(reversed(run.metrics), key=lambda m: m["val_error"])  # ties: the later evaluation
        assert text == f"{run.label}: {best['test_error']:.2f}% at epoch {best['epoch']}"
    assert panels["loss"][1] == [run.label for run in runs]


def test_table_shows_the_hardware_and_warns_when_runs_differ(two_runs, tmp_path):
    table = report.write_report(two_runs, str(tmp_path / "same"))
    ran_on = records.read_json(two_runs[0], records.SUMMARY_FILE)["provenance"]
    assert f"| 1 x {ran_on['device_kind']} ({ran_on['backend']}) |" in table and "Warning" not in table
    runs = [report.load_run(w) for w in two_runs]
    runs[1].summary["provenance"] = dict(runs[1].summary["provenance"], device_kind="NVIDIA H100", device_count=8,
                                         versions={**ran_on["versions"], "jax": "0.11.0"})
    table = report.table_markdown(runs)
    assert "| 8 x NVIDIA H100 (" in table and "**Warning: these runs differ in hardware or software**" in table
    assert f"device_kind: {ran_on['device_kind']} vs NVIDIA H100" in table and "device_count: 1 vs 8" in table
    assert "'jax': '0.11.0'" in table and "backend" not in table.split("Warning")[1]


def test_table_quotes_the_published_numbers_for_the_same_setting():
    run = report.RunRecord("w", {"dataset": "cifar10", "depth": 110, "p_last": 0.5, "survival_mode": "linear"},
                           [], {})
    assert report.references_for(run) == {"paper": 5.25, "pytorch_course_project": 5.20, "pytorch_projection": 5.15}
    run.config["p_last"] = 1.0
    assert report.references_for(run)["paper"] == 6.41
    assert report.references_for(run, "train_time_s") == {"paper": 74520}


def test_report_cli_errors_on_an_unfinished_workdir(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sd_jax.report", str(tmp_path), "--out", str(tmp_path / "o")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "lacks" in result.stderr


def run_notebook(path, parameters, cwd):
    """Execute a notebook's code cells in order, its "parameters" cell replaced by `parameters`."""
    namespace, _ = notebooks.execute(path, str(cwd), parameters)
    return namespace


def test_stored_quickstart_shows_outputs_made_by_its_code():
    """The quickstart is stored executed (GitHub shows its figures); its outputs must come from the
    code cells as they are: regenerate with `python -m tests.notebooks notebooks/quickstart.ipynb`."""
    with open(os.path.join(ROOT, "notebooks", "quickstart.ipynb")) as f:
        notebook = json.load(f)
    assert notebook["metadata"]["sd_jax"]["code_digest"] == notebooks.code_digest(notebook), \
        "the quickstart's code changed since its outputs were stored: run python -m tests.notebooks notebooks/quickstart.ipynb"
    outputs = [o for cell in notebooks.code_cells(notebook) for o in cell["outputs"]]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # figure 3 and the training times
    assert any("test error at best validation" in o.get("text", "") for o in outputs)


@pytest.mark.slow
def test_quickstart_notebook_runs_the_config_file(tmp_path):
    ns = run_notebook(os.path.join(ROOT, "notebooks", "quickstart.ipynb"),
                      'INSTALL = False\nREPO = ""\nWORKDIR = "run"\nREPORT_DIR = "report"\n'
                      'OVERRIDES = {"depth": 8, "num_epochs": 2}\n', tmp_path)
    assert ns["summary"]["epochs_completed"] == 2
    assert (tmp_path / "report" / "figure3.png").exists()
    # What ran is configs/quickstart.py with only the overrides changed (no copy to drift).
    expected = resolve_platform_defaults(resolve_convention(load_config(os.path.join(ROOT, "configs", "quickstart.py"))),
                                         jax.devices()[0].platform)
    expected.update(depth=8, num_epochs=2)
    assert records.read_json(str(tmp_path / "run"), records.CONFIG_FILE) == json.loads(expected.to_json_best_effort())


@pytest.mark.slow
def test_reproduce_paper_notebook_runs(tmp_path):
    ns = run_notebook(os.path.join(ROOT, "notebooks", "reproduce_paper.ipynb"),
                      'INSTALL = False\nREPO = ""\nTRAIN = True\nUSE_DRIVE = False\n'
                      'WORKDIRS = {"constant": "c", "stochastic": "s"}\nREPORT_DIR = "report"\n'
                      'OVERRIDES = {"dataset": "synthetic", "depth": 8, "num_epochs": 2, "lr_boundaries": (2,)}\n',
                      tmp_path)
    assert "5.25" not in ns["table"]  # no paper row for ResNet-8 on synthetic data
    assert (tmp_path / "report" / "training_time.png").exists()
    for workdir, name in (("c", "cifar10_resnet110_constant"), ("s", "cifar10_resnet110_sd")):
        expected = resolve_platform_defaults(resolve_convention(load_config(name)), jax.devices()[0].platform)
        expected.update(dataset="synthetic", depth=8, num_epochs=2, lr_boundaries=(2,))
        assert records.read_json(str(tmp_path / workdir), records.CONFIG_FILE) == json.loads(expected.to_json_best_effort())


def test_epoch_time_at_a_step_cadence_is_per_epoch():
    # eval_every_steps: lines cover half an epoch, half an epoch, then a quarter, each at 4 s/epoch.
    metrics = [{"epoch": 0.5, "epoch_time_s": 2.0}, {"epoch": 1, "epoch_time_s": 2.0},
               {"epoch": 1.25, "epoch_time_s": 1.0}]
    assert report.seconds_per_epoch(metrics) == pytest.approx([4.0, 4.0, 4.0])
    assert report.mean_epoch_time(metrics) == pytest.approx(4.0)
    per_epoch = [{"epoch": 1, "epoch_time_s": 3.0}, {"epoch": 2, "epoch_time_s": 5.0}]
    assert report.seconds_per_epoch(per_epoch) == [3.0, 5.0] and report.mean_epoch_time(per_epoch) == 4.0
