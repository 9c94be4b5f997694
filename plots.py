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
    """Median and min/max over seeds of `metric` against `x_key`, on the x values all seeds share.

    Records where the metric is missing or null (e.g. after divergence) are skipped per seed, so a diverged seed
    contributes only up to its last finite value.
    """
    per_seed = []
    for log in logs:
        points = {rec[x_key]: rec[metric] for rec in log["history"]
                  if rec.get(metric) is not None and rec.get(x_key) is not None}
        if points:
            per_seed.append(points)
    if not per_seed:
        return None
    xs = sorted(set.intersection(*(set(p) for p in per_seed)))
    if not xs:
        return None
    values = np.array([[p[x] for x in xs] for p in per_seed], dtype=float)
    return np.array(xs, dtype=float), np.median(values, axis=0), values.min(axis=0), values.max(axis=0)


def plot_metric(ax, logs, metric, label=None, x_key="iter", color=None, **line_kwargs):
    """Draw one run's `metric` (median over its seeds, with a min–max band when there are several)."""
    series = metric_series(logs, metric, x_key)
    if series is None:
        return None
    xs, median, low, high = series
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
