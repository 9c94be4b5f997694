"""Redraw every figure of the kit from run logs alone.

    python plots.py --logs runs/ --out figures/

Reads every JSON run log under --logs (recursively), groups the logs by their `experiment` key (e1 ... e6 for the toy
presets of SPEC.md, one group per model/data set for deep nets), and writes one PNG per figure into --out. Seeds of
the same run (same `run` label) are drawn as the median with a min–max band. File names are never parsed: all data
comes from the JSON. No LaTeX needed (matplotlib's mathtext only).
"""
import collections
import os

import matplotlib

matplotlib.use("Agg")  # files only; works on machines with no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import utils  # noqa: E402

# ======================================================================================================================
# Shared helpers
# ======================================================================================================================


def runs_by_label(logs):
    """{run label: [logs of its seeds]}, in the order the labels first appear (logs arrive sorted by path)."""
    groups = collections.OrderedDict()
    for log in logs:
        groups.setdefault(log.get("run", "run"), []).append(log)
    return groups


def metric_series(logs, metric, x_key="iter"):
    """Median and min/max over seeds of `metric` against `x_key`, at every x value any seed recorded.

    Records where the metric is missing or null (e.g. after divergence) are skipped per seed, so a diverged seed
    contributes only up to its last finite value and the statistics at each x use the seeds that have a value there.
    """
    per_seed = []
    for log in logs:
        points = {rec[x_key]: rec[metric] for rec in log["history"]
                  if rec.get(metric) is not None and rec.get(x_key) is not None}
        if points:
            per_seed.append(points)
    if not per_seed:
        return None
    xs = sorted(set().union(*per_seed))
    values = np.array([[p.get(x, np.nan) for x in xs] for p in per_seed], dtype=float)
    return (np.array(xs, dtype=float), np.nanmedian(values, axis=0), np.nanmin(values, axis=0),
            np.nanmax(values, axis=0))


def plot_metric(ax, logs, metric, label=None, x_key="iter", color=None, scale=1.0, **line_kwargs):
    """Draw one run's `metric` × `scale` (median over its seeds, with a min–max band when there are several)."""
    series = metric_series(logs, metric, x_key)
    if series is None:
        return None
    xs, median, low, high = (series[0],) + tuple(scale * values for values in series[1:])
    n_seeds = len(logs)
    if n_seeds > 1 and label is not None:
        label = f"{label} ({n_seeds} seeds)"
    (line,) = ax.plot(xs, median, label=label, color=color, **line_kwargs)
    if n_seeds > 1:
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def save_figure(fig, out_dir, name):
    """Write `fig` as <out_dir>/<name>.png, close it, and return the path."""
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ======================================================================================================================
# Figure drawers, one per script. Each takes (experiment name, its logs, out_dir) and returns the PNG paths it wrote.
# ======================================================================================================================

DRAWERS = {}


# ------------------------------------------------------------------------------------------ deep nets (E7–E10) -----


def draw_deep_net(experiment, logs, out_dir):
    """Figure 1 of the paper for one model × data set: train loss, test error and, per block, the feature sparsity
    (de-duplicated density solid, raw density dashed; SPEC §1.1) against epochs, one colour per run."""
    blocks = logs[0]["config"].get("blocks", [])
    panels = [("train_loss", "train loss", True), ("test_error", "test error (%)", False)]
    panels += [(block, f"{block}: feature density (%)", False) for block in blocks]
    n_cols = min(4, len(panels))
    n_rows = -(-len(panels) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4 * n_cols, 3.2 * n_rows), squeeze=False)
    for color_index, (label, runs) in enumerate(runs_by_label(logs).items()):
        color = f"C{color_index % 10}"
        for ax, (key, title, log_scale) in zip(axes.flat, panels):
            if key in blocks:
                plot_metric(ax, runs, f"density_dedup_{key}", label, "epoch", color, scale=100)
                plot_metric(ax, runs, f"density_{key}", None, "epoch", color, scale=100, linestyle="--", alpha=0.6)
            else:
                plot_metric(ax, runs, key, label, "epoch", color, scale=100 if key == "test_error" else 1)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            if log_scale:
                ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{experiment} (solid: de-duplicated density, dashed: raw density)")
    fig.tight_layout()
    return [save_figure(fig, out_dir, experiment)]


DRAWERS["train_resnet"] = draw_deep_net
DRAWERS["train_densenet"] = draw_deep_net


# ======================================================================================================================
# Entry point
# ======================================================================================================================


def main(argv=None):
    parser = utils.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", nargs="+", default=["runs"],
                        help="folders searched recursively for JSON run logs")
    parser.add_argument("--out", default="figures", help="folder the PNG figures are written to")
    args = parser.parse_args(argv)
    for folder in args.logs:
        if not os.path.isdir(folder):
            utils.usage_error("--logs", f"{folder!r} is not a folder; pass the --out-dir of your runs")
    utils.prepare_out_dir(args.out, "--out")
    logs = [log for folder in args.logs for log in utils.load_logs(folder)]
    if not logs:
        utils.usage_error("--logs", f"no run logs found under {' '.join(args.logs)}; run an experiment first")
    experiments = collections.OrderedDict()
    for log in logs:
        experiments.setdefault((log["script"], log.get("experiment", log["script"])), []).append(log)
    written = []
    for (script, experiment), group in experiments.items():
        drawer = DRAWERS.get(script)
        if drawer is None:
            print(f"skipping {len(group)} log(s) of unknown script {script!r}")
            continue
        written += drawer(experiment, group, args.out)
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
