"""Figures and tables from run workdirs, next to the paper's and PyTorch reimplementations' numbers.

    python -m sd_jax.report W1 [W2 ...] --out DIR      figure3.png, training_time.png, table.md
    python -m sd_jax.report --sweep ROOT --out DIR      figure8.png (test error against p_L)

Reads only each workdir's config.json, metrics.jsonl and summary.json.
"""
import dataclasses
import json
import os
from importlib import resources

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from sd_jax import cli  # noqa: E402

from sd_jax.training import provenance, records
from sd_jax.bench import expected_step_ratio  # noqa: E402
from sd_jax.models.cifar import ResNetCIFAR  # noqa: E402
from sd_jax.models.imagenet import ResNetImageNet  # noqa: E402


@dataclasses.dataclass
class RunRecord:
    workdir: str
    config: dict
    metrics: list
    summary: dict

    @property
    def schedule(self) -> str:
        return "constant" if self.config["p_last"] == 1.0 else self.config["survival_mode"]

    @property
    def label(self) -> str:
        depth = f"ResNet-{self.config['depth']}"
        if self.schedule == "constant":
            return f"{depth} constant depth"
        return f"{depth} stochastic depth ({self.schedule}, p_L={self.config['p_last']:g})"


def load_run(workdir: str) -> RunRecord:
    missing = [n for n in (records.CONFIG_FILE, records.METRICS_FILE, records.SUMMARY_FILE)
               if not os.path.exists(os.path.join(workdir, n))]
    if missing:
        raise FileNotFoundError(f"{workdir} lacks {missing}: is it a finished run's workdir?")
    return RunRecord(workdir, records.read_json(workdir, records.CONFIG_FILE), records.read_metrics(workdir),
                     records.read_json(workdir, records.SUMMARY_FILE))


def reference_results() -> dict:
    return json.loads(resources.files("sd_jax").joinpath("reference_results.json").read_text())


def references_for(run: RunRecord, kind: str = "test_error") -> dict:
    """{source: value} of the published numbers for the run's dataset, depth and schedule (and
    number of epochs, where a source gives several: the paper's ImageNet 90 and 120)."""
    c = run.config
    return {r["source"]: r["value"] for r in reference_results()[kind]
            if r["dataset"] == c["dataset"] and r["depth"] == c["depth"] and r["schedule"] == run.schedule
            and r["p_last"] == c["p_last"] and r.get("epochs", c.get("num_epochs")) == c.get("num_epochs")}


def plot_figure3(runs, path: str) -> dict:
    """The paper's Figure 3: test error (top) and training loss (bottom, log scale) against epoch,
    constant depth dashed. A dot marks each run's evaluation of lowest validation error; its test
    error is written in the legend, not beside the dot, so labels of runs ending close together
    cannot overlap. Returns {panel: (y label, legend texts)}."""
    fig, (error_ax, loss_ax) = plt.subplots(2, 1, figsize=(7.5, 7.5), sharex=True,
                                            gridspec_kw={"height_ratios": (3, 2)})
    for run in runs:
        epochs = [m["epoch"] for m in run.metrics]
        style = "--" if run.schedule == "constant" else "-"
        best, best_error = run.summary["best_val_epoch"], run.summary["test_error_at_best_val"]
        line, = error_ax.plot(epochs, [m["test_error"] for m in run.metrics], style,
                              label=f"{run.label}: {best_error:.2f}% at epoch {best}")
        error_ax.plot([best], [best_error], "o", color=line.get_color())
        loss_ax.plot(epochs, [m["train_loss"] for m in run.metrics], style, color=line.get_color(), label=run.label)
    error_ax.set(ylabel="test error (%)",
                 title=f"{runs[0].config['dataset']}: test error and training loss "
                       "(dot and legend: test error at the lowest validation error)")
    error_ax.title.set_fontsize(9)
    loss_ax.set(xlabel="epoch", ylabel="training loss", yscale="log")
    loss_ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    loss_ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    loss_ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    panels = {}
    for name, ax in (("error", error_ax), ("loss", loss_ax)):
        ax.grid(alpha=0.3)
        legend = ax.legend(fontsize=8)
        panels[name] = (ax.get_ylabel(), [text.get_text() for text in legend.get_texts()])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return panels


def seconds_per_epoch(metrics) -> list:
    """Training seconds per epoch over each metrics line's interval: a line holds the time since the
    line before, which spans a whole epoch, or a fraction of one with `eval_every_steps`."""
    starts = [0] + [m["epoch"] for m in metrics[:-1]]
    return [m["epoch_time_s"] / (m["epoch"] - start) for m, start in zip(metrics, starts)]


def mean_epoch_time(metrics) -> float:
    """Mean training seconds per epoch of a run: its training time over the epochs it covers."""
    return sum(m["epoch_time_s"] for m in metrics) / metrics[-1]["epoch"]


def run_model(config: dict):
    """The network of a run's config.json record, enough for its survival schedule and costs (runs
    from before the `model` key are CIFAR ResNets)."""
    schedule = dict(p_last=config["p_last"], survival_mode=config["survival_mode"])
    if config.get("model", "resnet_cifar") == "resnet_imagenet":
        return ResNetImageNet(config["depth"], drop_downsample_blocks=config["drop_downsample_blocks"], **schedule)
    return ResNetCIFAR(config["depth"], **schedule)


def time_ratios(runs) -> list:
    """(run, measured mean epoch time / constant's, expected from survival probabilities) per SD run."""
    constants = {(r.config["dataset"], r.config["depth"]): r for r in runs if r.schedule == "constant"}
    out = []
    for run in runs:
        base = constants.get((run.config["dataset"], run.config["depth"]))
        if base is None or run is base:
            continue
        out.append((run, mean_epoch_time(run.metrics) / mean_epoch_time(base.metrics),
                    expected_step_ratio(run_model(run.config))))
    return out


def plot_training_time(runs, path: str) -> None:
    """Per-epoch time and cumulative training time per run, with the SD/constant ratios."""
    fig, (per_epoch, total) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        epochs = [m["epoch"] for m in run.metrics]
        times = [m["epoch_time_s"] for m in run.metrics]
        style = "--" if run.schedule == "constant" else "-"
        per_epoch.plot(epochs, seconds_per_epoch(run.metrics), style, label=run.label)
        cumulative = [sum(times[:i + 1]) / 60.0 for i in range(len(times))]
        total.plot(epochs, cumulative, style, label=run.label)
    per_epoch.set(xlabel="epoch", ylabel="training time per epoch (s)", title="epoch time")
    total.set(xlabel="epoch", ylabel="cumulative training time (min)", title="wall-clock (training only)")
    notes = [f"{r.label}: measured {m:.3f} x constant, expected {e:.3f}" for r, m, e in time_ratios(runs)]
    for ax in (per_epoch, total):
        ax.grid(alpha=0.3)
    per_epoch.legend(fontsize=7)
    caption_lines = len(notes)
    fig.text(0.01, 0.01, "\n".join(notes), fontsize=8, va="bottom")
    fig.tight_layout(rect=(0, 0.045 * caption_lines, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table_markdown(runs) -> str:
    """One row per run with its numbers and the published ones for the same setting."""
    sources = reference_results()["sources"]
    header = ("| run | dataset | depth | p_L | schedule | epochs | test error at best val (%) | best val epoch "
              "| final test error (%) | train time | hardware | paper (%) | PyTorch reimplementations (%) |")
    lines = [header, "|" + "---|" * 13]
    for run in runs:
        refs = references_for(run)
        paper = f"{refs['paper']:.2f}" if "paper" in refs else "–"
        torch = ", ".join(f"{v:.2f} ({k.replace('pytorch_', '').replace('_', ' ')})"
                          for k, v in refs.items() if k != "paper") or "–"
        s, c = run.summary, run.config
        lines.append(f"| {os.path.basename(os.path.normpath(run.workdir))} | {c['dataset']} | {c['depth']} "
                     f"| {c['p_last']:g} | {run.schedule} | {s['epochs_completed']} | {s['test_error_at_best_val']:.2f} "
                     f"| {s['best_val_epoch']} | {s['final_test_error']:.2f} | {cli.format_duration(s['train_time_s'])} "
                     f"| {provenance.hardware(s.get('provenance'))} | {paper} | {torch} |")
    differences = provenance.differences([run.summary.get("provenance") for run in runs])
    if len(runs) > 1 and differences:
        lines.append("\n**Warning: these runs differ in hardware or software**, so their times (and possibly "
                     "their errors) are not like for like: " + "; ".join(differences) + ".")
    for run, measured, expected in time_ratios(runs):
        lines.append(f"\nTraining time of {run.label}: {measured:.3f} x constant depth (mean epoch time), "
                     f"expected {expected:.3f} from the survival probabilities.")
    paper_times = reference_results()["train_time_s"]
    lines.append("\nPaper training times (ResNet-110, CIFAR-10, Torch7 on one TITAN X): "
                 + ", ".join(f"{'constant' if t['schedule'] == 'constant' else 'stochastic'} depth "
                             f"{t['note'].split(',')[0]}" for t in paper_times) + ".")
    lines.append("\nSources: " + "; ".join(f"{k}: {v}" for k, v in sources.items()) + ".")
    return "\n".join(lines) + "\n"


def sweep_points(root: str):
    """({mode: [(p_L, test error at best val), ...]} of the finished runs under a sweep root,
    [(mode, p_L), ...] of the grid's runs not finished yet: the grid is the sweep's sweep.json)."""
    from sd_jax import sweep

    points, finished = {}, set()
    for name in sorted(os.listdir(root)):
        workdir = os.path.join(root, name)
        if os.path.isdir(workdir) and os.path.exists(os.path.join(workdir, records.SUMMARY_FILE)):
            run = load_run(workdir)
            points.setdefault(run.config["survival_mode"], []).append(
                (run.config["p_last"], run.summary["test_error_at_best_val"]))
            finished.add(name)
    planned = (records.read_json(root, sweep.GRID_FILE) if os.path.exists(os.path.join(root, sweep.GRID_FILE))
               else {"p_lasts": [], "modes": []})
    missing = [(mode, p) for mode, p in sweep.grid(planned["p_lasts"], planned["modes"])
               if sweep.run_name(mode, p) not in finished]
    return {mode: sorted(p) for mode, p in points.items()}, missing


def plot_figure8(points: dict, path: str, missing=()) -> list:
    """Test error against p_L for linear decay and uniform survival (paper Fig. 8), the grid's runs
    not finished yet named under the axes; returns the plotted series as (label, xs, ys)."""
    fig, ax = plt.subplots(figsize=(6, 4.6 if missing else 4.2))
    for mode in sorted(points):
        xs, ys = zip(*points[mode])
        ax.plot(xs, ys, marker="o", label=f"{mode} {'decay' if mode == 'linear' else 'survival'}")
    series = [(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()]
    ax.set(xlabel="survival probability of the last block, p_L", ylabel="test error at best validation (%)",
           title="Test error against p_L")
    ax.grid(alpha=0.3)
    ax.legend()
    if missing:
        fig.text(0.01, 0.01, "not finished yet: " + ", ".join(f"{mode} p_L={p:g}" for mode, p in missing),
                 fontsize=8, color="0.35", wrap=True)
    fig.tight_layout(rect=(0, 0.06 if missing else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return series


def write_report(workdirs, out: str) -> str:
    runs = [load_run(w) for w in workdirs]
    os.makedirs(out, exist_ok=True)
    plot_figure3(runs, os.path.join(out, "figure3.png"))
    plot_training_time(runs, os.path.join(out, "training_time.png"))
    table = table_markdown(runs)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    return table


def arg_parser():
    p = cli.parser(__doc__)
    p.add_argument("workdirs", nargs="*", help="run workdirs to compare")
    p.add_argument("--sweep", help="a sweep root (python -m sd_jax.sweep) to plot as figure8.png")
    p.add_argument("--out", required=True, help="folder for the figures and table")
    return p


def run(args):
    if not args.workdirs and not args.sweep:
        raise records.WorkdirError("give run workdirs, --sweep ROOT, or both")
    if args.workdirs:
        print(write_report(args.workdirs, args.out))
    if args.sweep:
        points, missing = sweep_points(args.sweep)
        if not points:
            raise FileNotFoundError(f"no finished runs under {args.sweep}")
        os.makedirs(args.out, exist_ok=True)
        plot_figure8(points, os.path.join(args.out, "figure8.png"), missing)
        print(json.dumps({"points": points, "missing": missing}))


def main(argv=None):
    return cli.main(arg_parser(), run, argv)


if __name__ == "__main__":
    main()
