"""Redraw every figure of the kit from run logs alone.

    python plots.py --logs runs/ --out-dir figures/

Reads every JSON run log under --logs (recursively), groups the logs by their `experiment` key (e1 ... e6 for the toy
presets, one group per model/data set for deep nets), and writes one PNG per figure into --out-dir. Seeds of
the same run (same `run` label) are drawn as the median with a min–max band. File names are never parsed: all data
comes from the JSON. No LaTeX needed (matplotlib's mathtext only).
"""
import collections
import json
import os

import matplotlib.colors
import matplotlib.figure
import matplotlib.lines
import matplotlib.patches
import numpy as np

import utils

# ======================================================================================================================
# Shared helpers
# ======================================================================================================================


def load_logs(folder):
    """All run logs (*.json, recursively) under `folder`, each with its file path under the key `_path`."""
    logs = []
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(".json") and not name.startswith("."):
                path = os.path.join(root, name)
                with open(path) as f:
                    try:
                        log = json.load(f)
                    except json.JSONDecodeError:
                        continue
                if isinstance(log, dict) and "history" in log and "script" in log:
                    log["_path"] = path
                    logs.append(log)
    return logs


def runs_by_label(logs):
    """{run label: [logs of its seeds]}, ordered by the logs' `run_index` (the run's position in its preset, written
    by the toy scripts) so that legends follow the paper's run order, not file names (where 'lr0.282_div1.5' sorts
    before 'lr0.282_div4.8'). Labels without a run_index (e.g. deep nets) keep the order they first appear in (logs
    arrive sorted by path), after the indexed ones."""
    groups = collections.OrderedDict()
    for log in logs:
        groups.setdefault(log.get("run", "run"), []).append(log)
    order = sorted(groups, key=lambda label: min(log.get("run_index", float("inf")) for log in groups[label]))
    return collections.OrderedDict((label, groups[label]) for label in order)


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


def new_figure(rows, cols, size):
    """A figure and its rows×cols array of axes. Built without pyplot, so that importing or calling this module never
    touches matplotlib's global state (backend, open figures); PNGs need no display."""
    fig = matplotlib.figure.Figure(figsize=size)
    return fig, fig.subplots(rows, cols, squeeze=False)


def save_figure(fig, out_dir, name):
    """Write `fig` as <out_dir>/<name>.png, close it, and return the path."""
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


# ======================================================================================================================
# Figure drawers, one per script. Each takes (experiment name, its logs, out_dir) and returns the PNG paths it wrote.
# ======================================================================================================================

DRAWERS = {}


# ------------------------------------------------------------------------------------------ deep nets (E7–E10) -----


def draw_deep_net(experiment, logs, out_dir):
    """Figure 1 of the paper for one model × data set: train loss, test error and, per block, the feature sparsity
    (de-duplicated density solid, raw density dashed) against epochs, one colour per run."""
    blocks = logs[0]["config"].get("blocks", [])
    panels = [("train_loss", "train loss", True), ("test_error", "test error (%)", False)]
    panels += [(block, f"{block}: feature density (%)", False) for block in blocks]
    n_cols = min(4, len(panels))
    n_rows = -(-len(panels) // n_cols)
    fig, axes = new_figure(n_rows, n_cols, (4 * n_cols, 3.2 * n_rows))
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


# ----------------------------------------------------------------------- ReLU toys, two_layer_relu.py (E4–E6) -----

# Panels per preset: (metric key or special panel, title, log-scale y). Sparsity keys name the raw density of a layer,
# density_<layer>; the de-duplicated one is density_dedup_<layer>.
_RELU_LOSSES = [("train_loss", "train loss", True), ("test_loss", "test loss", True)]
_RELU_RANK = ("rank", "rank of the Jacobian", False)
RELU_TOY_PANELS = {
    "e4": [_RELU_LOSSES[0], ("function", "learned function (after the last step)", False), _RELU_RANK,
           ("density_layer1", "feature density (%)", False)],
    "e5": [*_RELU_LOSSES, _RELU_RANK, ("density_layer1", "feature density (%)", False)],
    "e6": [*_RELU_LOSSES, _RELU_RANK, ("density_layer1", "feature density, layer 1 (%)", False),
           ("density_layer2", "feature density, layer 2 (%)", False)],
}


def _toy_decay_line(ax, runs, color):
    """Dashed vertical line at the run's last large-step iteration ⌊T·N⌋, logged by both toy scripts as
    config.decay_iter (none for constant runs)."""
    decay_iter = runs[0]["config"].get("decay_iter")
    if decay_iter is not None:
        ax.axvline(decay_iter, color=color, linestyle="--", linewidth=0.8, alpha=0.7)


# Line style of a run whose seeds ALL diverged (both toy drawers): dash-dot, with an × at the last finite evaluation.
TOY_ALL_DIVERGED_STYLE = {"linestyle": "-.", "marker": "x", "markevery": [-1]}


def _toy_seeds_to_draw(label, runs):
    """How both toy drawers treat diverged seeds (large-step runs sit at the edge of divergence): returns
    (legend label, logs to draw, extra line style).

    Diverged seeds stay out of the median and the min–max band (their blow-up would stretch the band over tens of
    decades) and are counted in the label instead, '[3/16 diverged]'. A run whose seeds all diverged is drawn from
    those seeds, up to their divergence, in TOY_ALL_DIVERGED_STYLE, so it cannot be mistaken for a surviving run.
    """
    kept = [log for log in runs if log["status"] != "diverged"]
    if len(kept) < len(runs):
        label = f"{label} [{len(runs) - len(kept)}/{len(runs)} diverged]"
    return label, kept or runs, {} if kept else dict(TOY_ALL_DIVERGED_STYLE)


def _relu_learned_function(ax, runs, label, color):
    """E4: the learned function on the stored grid (median over seeds, min–max band) with the 12 data points."""
    grids = [log["function_grid"] for log in runs if log.get("function_grid")]
    if not grids:
        return
    x, values = np.array(grids[0]["x"]), np.array([grid["y"] for grid in grids], dtype=float)
    ax.plot(x, np.median(values, axis=0), color=color, label=label)
    if len(grids) > 1:
        ax.fill_between(x, values.min(axis=0), values.max(axis=0), color=color, alpha=0.2, linewidth=0)
    ax.scatter(grids[0]["data_x"], grids[0]["data_y"], color="black", s=14, zorder=3)


def draw_relu_toy(experiment, logs, out_dir):
    """E4/E5/E6: losses (log scale), Jacobian rank and feature density (de-duplicated solid, raw dotted)
    against iterations, one colour per run, dashed lines at the decay points; plus the E5 neuron-movement figure."""
    preset = logs[0]["config"]["preset"]
    panels = RELU_TOY_PANELS[preset]
    fig, axes = new_figure(1, len(panels), (3.9 * len(panels), 3.4))
    for color_index, (label, runs) in enumerate(runs_by_label(logs).items()):
        color = f"C{color_index % 10}"
        label, drawn, style = _toy_seeds_to_draw(label, runs)
        for ax, (key, title, log_scale) in zip(axes.flat, panels):
            ax.set_title(title, fontsize=10)
            if key == "function":
                _relu_learned_function(ax, drawn, label, color)
                ax.set_xlabel("x")
                continue
            if key.startswith("density_"):
                dedup_key = key.replace("density_", "density_dedup_", 1)
                plot_metric(ax, drawn, dedup_key, label, color=color, scale=100, **style)
                plot_metric(ax, drawn, key, None, color=color, scale=100, **dict(style, linestyle=":", alpha=0.7))
            else:
                plot_metric(ax, drawn, key, label, color=color, **style)
            _toy_decay_line(ax, runs, color)
            ax.set_xlabel("iteration")
            if log_scale:
                ax.set_yscale("log")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{experiment}: density solid = de-duplicated, dotted = raw; dashed lines = decay points",
                 fontsize=10)
    fig.tight_layout()
    written = [save_figure(fig, out_dir, experiment)]
    if preset == "e5" and logs[0]["config"]["input_dim"] == 2:  # the neuron picture is the input plane (d = 2)
        written.append(draw_neuron_movement(experiment, logs, out_dir))
    return written


def _neuron_panel(ax, neurons):
    """Teacher directions as arrows from the origin (green a* > 0, red a* < 0); student first-layer neurons at init
    (grey) moving to their end position (colour = sign of the output weight, size ∝ |a_j|)."""
    # the inputs lie on the unit circle
    ax.add_patch(matplotlib.patches.Circle((0, 0), 1, fill=False, linestyle=":", color="0.5"))
    for w, a in zip(np.array(neurons["teacher_w"]), neurons["teacher_a"]):
        ax.annotate("", xy=w, xytext=(0, 0), arrowprops=dict(arrowstyle="-|>", color="C2" if a > 0 else "C3", lw=2))
    start, end = np.array(neurons["student_w_init"]), np.array(neurons["student_w_end"])
    out = np.array(neurons["student_a_end"])
    ax.quiver(start[:, 0], start[:, 1], *(end - start).T, angles="xy", scale_units="xy", scale=1, color="0.6",
              width=0.004)
    ax.scatter(*start.T, s=10, color="0.6")
    sizes = 8 + 80 * np.abs(out) / max(np.abs(out).max(), 1e-12)
    ax.scatter(*end.T, s=sizes, c=np.where(out > 0, "C2", "C3"), edgecolors="black", linewidths=0.5, zorder=3)
    reach = max(1.1, np.abs(np.concatenate([start, end])).max() * 1.1)
    ax.set_xlim(-reach, reach)
    ax.set_ylim(-reach, reach)
    ax.set_aspect("equal")


def draw_neuron_movement(experiment, logs, out_dir):
    """E5 neuron movement: one panel per run, from its lowest seed that has neuron data (diverged seeds
    have none)."""
    groups = runs_by_label(logs)
    fig, axes = new_figure(1, len(groups), (3.6 * len(groups), 3.9))
    for ax, (label, runs) in zip(axes.flat, groups.items()):
        with_data = [log for log in runs if log.get("neurons")] or runs
        log = min(with_data, key=lambda item: item.get("seed", 0))
        ax.set_title(f"{label}\nseed {log.get('seed')}", fontsize=9)
        if log.get("neurons"):
            _neuron_panel(ax, log["neurons"])
        else:
            ax.text(0.5, 0.5, f"no neuron data\n(run {log['status']})", transform=ax.transAxes, ha="center")
            ax.set_axis_off()
    handles = [matplotlib.lines.Line2D([], [], color="C2", lw=2, label="teacher, a* > 0"),
               matplotlib.lines.Line2D([], [], color="C3", lw=2, label="teacher, a* < 0"),
               matplotlib.lines.Line2D([], [], marker="o", color="0.6", linestyle="none", label="student at init"),
               matplotlib.lines.Line2D([], [], marker="o", color="C2", markeredgecolor="black", linestyle="none",
                          label="student at end, a > 0 (size ∝ |a|)"),
               matplotlib.lines.Line2D([], [], marker="o", color="C3", markeredgecolor="black", linestyle="none",
                          label="student at end, a < 0")]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"{experiment}: first-layer neurons w_j (init → end) and teacher directions", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))  # room for the legend below and the title above
    return save_figure(fig, out_dir, f"{experiment}_neurons")


DRAWERS["two_layer_relu"] = draw_relu_toy


# --------------------------------------------------------------------- diagonal linear nets, diag_net.py (E1–E3) -----

DIAG_NET_PANELS = [("train_loss", "train loss", True), ("test_loss", "test loss", True),
                   ("rank", r"rank of $\varphi(X)$", False), ("l0", r"$\|\beta\|_0$", False)]
DIAG_NET_LOSS_CLIP = 100.0  # E3: the loss-surface contours are clipped at 100


def _diag_net_curves(experiment, logs, out_dir, name):
    """E1/E2 panels: train and test loss (log scale), rank of φ(X), ‖β‖₀ against iterations; one colour
    per run, median and min–max band over its non-diverged seeds, dashed lines at the decay iterations ⌊T·N⌋."""
    fig, axes = new_figure(1, len(DIAG_NET_PANELS), (3.9 * len(DIAG_NET_PANELS), 3.4))
    for color_index, (label, runs) in enumerate(runs_by_label(logs).items()):
        color = f"C{color_index % 10}"
        label, drawn, style = _toy_seeds_to_draw(label, runs)
        for ax, (key, title, log_scale) in zip(axes[0], DIAG_NET_PANELS):
            plot_metric(ax, drawn, key, label, color=color, **style)
            _toy_decay_line(ax, runs, color)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("iteration")
            if log_scale:
                ax.set_yscale("log")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8)
    config = logs[0]["config"]
    fig.suptitle(f"{experiment}: diagonal linear net, n = {config['n_train']}, d = {config['input_dim']}, "
                 f"r = {config['support_size']}; dashed lines = decay points", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 * -(-len(labels) // 3), 1, 1))  # room for the legend rows below the panels
    return save_figure(fig, out_dir, name)


def _diag_net_surface_panel(ax, surface, logs, key, title):
    """One E3 panel: filled log-scale contours of the stored loss grid (clipped at 100), projected trajectories of
    every run and seed, markers at w_init, w_flow, w*."""
    coords = np.array(surface["coords"], dtype=float)
    loss = np.minimum(np.array(surface[key], dtype=float), DIAG_NET_LOSS_CLIP)
    floor = loss[loss > 0].min()
    levels = np.logspace(np.log10(floor), np.log10(DIAG_NET_LOSS_CLIP), 25)
    filled = ax.contourf(coords, coords, np.maximum(loss, floor), levels=levels, cmap="viridis",
                         norm=matplotlib.colors.LogNorm(floor, DIAG_NET_LOSS_CLIP))
    colorbar = ax.figure.colorbar(filled, ax=ax, shrink=0.9)
    colorbar.set_ticks(10.0 ** np.arange(np.ceil(np.log10(floor)), np.log10(DIAG_NET_LOSS_CLIP) + 1))
    colorbar.set_ticklabels([f"1e{k:.0f}" for k in np.log10(colorbar.get_ticks())])
    for color_index, (label, runs) in enumerate(runs_by_label(logs).items()):
        # a run ending at a sign-flipped copy of w* (still u⊙v = θ*) ends off this plane: say so in the legend
        flipped = sum(bool(log.get("end_state") and log["end_state"]["negative_support_coords"]) for log in runs)
        if flipped:
            label = f"{label}\n[{flipped}/{len(runs)} end at a sign-flipped w*, off this plane]"
        for seed_index, log in enumerate(runs):
            path = log.get("trajectory_2d")
            if path:
                ax.plot(path["a"], path["b"], color=f"C{(color_index + 1) % 10}", linewidth=0.7, alpha=0.85,
                        label=label if seed_index == 0 else None)
    markers = [("w_init", "o", "white", r"$w_{init}$"), ("w_flow", "s", "C1", r"$w_{flow}$"),
               ("w_star", "*", "red", r"$w^*$")]
    for name, marker, color, text in markers:
        ax.plot(*surface[name], marker=marker, color=color, markeredgecolor="black", markersize=10, linestyle="none",
                label=text, zorder=4)
    ax.set_xlim(coords[0], coords[-1])
    ax.set_ylim(coords[0], coords[-1])
    ax.set_xlabel(r"$e_1$ (towards $w^*$)")
    ax.set_ylabel(r"$e_2$ (towards $w_{flow}$)")
    ax.set_title(title, fontsize=10)


def draw_diag_net(experiment, logs, out_dir):
    """diag_net.py figures: E1/E2 (and custom runs) -> <experiment>.png with the four panels of E1;
    E3 -> e3.png, the loss surface on the plane through w_init, w*, w_flow, plus e3_metrics.png."""
    surface = next((log["surface"] for log in logs if log.get("surface")), None)
    if surface is None:
        return [_diag_net_curves(experiment, logs, out_dir, experiment)]
    fig, axes = new_figure(1, 2, (12, 5))
    _diag_net_surface_panel(axes[0, 0], surface, logs, "train_loss", "train loss (log scale, clipped at 100)")
    _diag_net_surface_panel(axes[0, 1], surface, logs, "test_loss", "test loss (log scale, clipped at 100)")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{experiment}: loss surface of the diagonal linear net on the plane through "
                 r"$w_{init}$, $w^*$, $w_{flow}$, with the projected trajectories", fontsize=10)
    fig.tight_layout()
    return [save_figure(fig, out_dir, experiment), _diag_net_curves(experiment, logs, out_dir, f"{experiment}_metrics")]


DRAWERS["diag_net"] = draw_diag_net


# ======================================================================================================================
# Entry point
# ======================================================================================================================


def main(argv=None):
    parser = utils.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", nargs="+", default=["runs"],
                        help="folders searched recursively for JSON run logs")
    parser.add_argument("--out-dir", default="figures", help="folder the PNG figures are written to")
    args = parser.parse_args(argv)
    for folder in args.logs:
        if not os.path.isdir(folder):
            utils.usage_error("--logs", f"{folder!r} is not a folder; pass the --out-dir of your runs")
    utils.prepare_out_dir(args.out_dir)
    logs = [log for folder in args.logs for log in load_logs(folder)]
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
        written += drawer(experiment, group, args.out_dir)
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
