"""Redraw every figure of the kit from run logs alone.

    python plots.py --logs runs/ --out-dir figures/

Reads every JSON run log under --logs (recursively), groups the logs by their `experiment` key (e1 ... e6 for the toy
presets, one group per model/data set for deep nets, split into one figure per setting: runs that differ only in their
step-size schedule or label noise, see deep_settings), and writes one PNG per figure into --out-dir. Within a figure,
logs are seeds of one line only when their whole `config` is equal except the seed and bookkeeping keys (plot_lines);
lines that share a label but differ in another key (a toy preset's runs, or any figure drawn with draw_deep_net
directly) say so in the legend ("… (epochs 8)"). The seeds of a
line are drawn as the median with a min–max band; a run that is still running, was interrupted or failed is drawn as
its own line, marked in the legend, never merged into a finished run's median. File names are never parsed: all data
comes from the JSON. No LaTeX needed (matplotlib's mathtext only). The PNGs are byte-identical from run to run with the
matplotlib version pinned in requirements.txt: Agg renderer, no pyplot state, and matplotlib writes no time stamp into
a PNG (its metadata holds only matplotlib's version), so `python plots.py --logs results --out-dir results` redraws the
committed figures exactly.
"""
import collections
import json
import os

import matplotlib.colors
import matplotlib.figure
import matplotlib.lines
import matplotlib.patches
import matplotlib.ticker
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


# ----------------------------------------------------------------------------- which logs are seeds of one line -----

# Config keys that do not change the experiment, left out when deciding whether two logs are seeds of one run: the seed
# itself (and the seed list of a multi-seed toy invocation); where files live and whether data may be downloaded; the
# device and how the same computation is executed on it (requested precision — the one used is `precision_used` —,
# compile, memory layout, deterministic kernels: rounding only); how evaluation is batched and how often a toy log is
# rewritten; how a deep run was started or continued (--stop-at-epoch, --resume, --restart); the requested --sync-bn
# (what BatchNorm normalised over is `batchnorm_share`, which is compared).
NOT_THE_EXPERIMENT = frozenset({
    "seed", "seeds",
    "out_dir", "data_dir", "download",
    "device", "precision", "compile", "channels_last", "deterministic",
    "eval_batch_size", "log_interval", "stop_at_epoch", "resume", "restart", "sync_bn",
    # measurements that do not change the trajectory (a run is the same with and without them; tested)
    "sharpness_every", "sharpness_examples", "sharpness_examples_used", "sharpness_rtol", "sharpness_max_iters",
    # computed from the keys above and the data set: equal whenever those are
    "n_test", "num_classes", "steps_per_epoch", "total_steps", "sparsity_examples_used", "blocks", "decay_iter",
})

# Keys the `run` label already spells out (utils.schedule_label for deep nets, utils.toy_run_names for toys): a legend
# names them only to tell apart lines that share a label.
LABELLED_KEYS = frozenset({"lr", "lr_schedule", "warmup_exp", "large_lr_frac", "momentum", "weight_decay", "augment",
                           "decay", "warmup_factor", "warmup_power", "algorithm", "label_noise"})

# Statuses of a run that did not finish (utils.RUN_STATUSES less completed and diverged): never part of a median.
UNFINISHED = ("running", "interrupted", "failed")

# Line style of an unfinished run (all drawers): an open circle at its last evaluation.
UNFINISHED_STYLE = {"marker": "o", "markevery": [-1], "markerfacecolor": "none"}


class Line(collections.namedtuple("Line", "label logs unfinished")):
    """One line of a figure: its legend label (without the seed count), the logs of its seeds, and whether it is a
    single unfinished run."""


def _is_off(value):
    """A value a newly added flag takes by default (a feature switched off: 0, False, None, empty). A config written
    before the flag existed lacks the key; comparing configs without such values makes the two equal."""
    return value in (None, 0, "", [], {})  # 0 == 0.0 == False


def experiment_config(log):
    """The part of a log's config that defines the experiment: every key except NOT_THE_EXPERIMENT, and except keys
    whose value is off (so that a key missing from an older log equals its default)."""
    return {key: value for key, value in log.get("config", {}).items()
            if key not in NOT_THE_EXPERIMENT and not _is_off(value)}


def _shown_value(value):
    """A config value as a legend shows it."""
    if isinstance(value, bool) or value is None:
        return {True: "on", False: "off", None: "none"}[value]
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "/".join(map(_shown_value, value))
    return str(value)


def _progress(log):
    """How far an unfinished run got, from its last evaluation record."""
    if not log["history"]:
        return "before its first evaluation"
    last = log["history"][-1]
    if last.get("epoch") is not None:
        return f"logged up to epoch {round(last['epoch'], 2):g}"
    return f"logged up to iteration {last['iter']}"


def plot_lines(logs):
    """The lines of one figure, as a list of Line.

    Logs are seeds of one line when they share their `run` label and their experiment_config; the finished ones
    (completed or diverged: the drawers decide what a diverged seed contributes) make one line, and every unfinished
    log (UNFINISHED) is a line of its own, labelled with its status, its seed and how far it got. A label gets
    '(key value, …)' for every config key in which its line differs from another line: keys the label does not spell
    out (LABELLED_KEYS) whenever they vary in the figure, and any key that tells apart two lines of the same label.
    Lines follow the logs' `run_index` (the run's position in its preset, written by the toy scripts), so that legends
    follow the paper's run order, not file names (where 'lr0.282_div1.5' sorts before 'lr0.282_div4.8'); labels
    without a run_index (deep nets) keep the order they first appear in (logs arrive sorted by path), after the
    indexed ones; the lines of one label stay together, in order of appearance.
    """
    configs = collections.OrderedDict()  # (label, canonical config) -> (experiment config, logs)
    for log in logs:
        config = experiment_config(log)
        key = (log.get("run", "run"), json.dumps(config, sort_keys=True))
        configs.setdefault(key, (config, []))[1].append(log)
    labels = list(collections.OrderedDict.fromkeys(label for label, _ in configs))
    rank = {label: (min(log.get("run_index", float("inf")) for log in logs if log.get("run", "run") == label),
                    labels.index(label)) for label in labels}
    groups = sorted(configs, key=lambda key: rank[key[0]])  # stable: config groups keep their order of appearance

    # config keys in order of first appearance; a key varies when two groups hold different values (missing = off)
    keys = list(collections.OrderedDict.fromkeys(key for config, _ in configs.values() for key in config))

    def varying(cohort):
        return {key for key in keys if len({json.dumps(configs[group][0].get(key)) for group in cohort}) > 1}

    unlabelled = varying(groups) - LABELLED_KEYS
    lines = []
    for group in groups:
        label, (config, members) = group[0], configs[group]
        shown = unlabelled | varying([other for other in groups if other[0] == label])
        if shown:
            raw = members[0].get("config", {})
            label += " (" + ", ".join(f"{key.replace('_', '-')} {_shown_value(raw.get(key))}"
                                      for key in keys if key in shown) + ")"
        finished = [log for log in members if log.get("status") not in UNFINISHED]
        if finished:
            lines.append(Line(label, finished, False))
        for log in members:
            if log.get("status") in UNFINISHED:
                seed = "" if log.get("seed") is None else f"seed {log['seed']}, "
                lines.append(Line(f"{label} ({seed}{log['status']}; {_progress(log)})", [log], True))
    return lines


def common_config(logs, key, missing=None):
    """The value of config[key] shared by all logs, or `missing` when the logs disagree (the legend then names it)."""
    values = {json.dumps(log.get("config", {}).get(key), sort_keys=True) for log in logs}
    return logs[0].get("config", {}).get(key) if len(values) == 1 else missing


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


class PlainLogFormatter(matplotlib.ticker.LogFormatter):
    """Log-axis tick labels as plain numbers (0.01, 2, 10 instead of 1e-02, 2×10^0), on the ticks LogFormatter
    chooses to label (its minor ticks too, when a panel spans less than a decade)."""

    def __call__(self, x, pos=None):
        return f"{x:g}" if super().__call__(x, pos) else ""


def draw_decay_lines(ax, positions, color):
    """Dashed vertical lines at a run's step-size decays (in the panel's x units), in the run's colour."""
    for x in positions:
        ax.axvline(x, color=color, linestyle="--", linewidth=0.8, alpha=0.7)


# The sharpness panel every drawer adds when its logs have `sharpness` records (--sharpness-every): (key, title,
# log-scale y). Logs without them keep their figures exactly as before (no panel, same size).
SHARPNESS_PANEL = ("sharpness", r"sharpness $\lambda_{max}$ (solid) vs $2/\eta$ (dashed), log scale", True)


def has_sharpness(logs):
    """Whether any evaluation record of any log holds a `sharpness` measurement."""
    return any(record.get("sharpness") is not None for log in logs for record in log["history"])


def draw_sharpness(ax, logs, color, x_key="iter", **style):
    """λ_max, the logged `sharpness` (median over seeds with a min–max band, like every other panel), and the
    stability threshold 2/η from the logged step size `lr`, dashed in the same colour, over the x range where λ_max
    was measured. On a quadratic, GD with step η is stable only while λ_max < 2/η: large-step GD settles at 2/η (the
    edge of stability), the paper's large-step SGD below it. No decay lines here: 2/η steps up at every decay."""
    line = plot_metric(ax, logs, "sharpness", None, x_key, color, **style)
    steps = metric_series(logs, "lr", x_key)
    if line is None or steps is None:
        return
    measured = np.asarray(line.get_xdata(), dtype=float)
    xs, lrs = steps[0], steps[1]
    inside = (xs >= measured.min()) & (xs <= measured.max()) & (lrs > 0)
    ax.plot(xs[inside], 2 / lrs[inside], color=color, linestyle="--", linewidth=1.0)


# ======================================================================================================================
# Figure drawers, one per script. Each takes (experiment name, its logs, out_dir) and returns the PNG paths it wrote.
# ======================================================================================================================

DRAWERS = {}


# ------------------------------------------------------------------------------------------ deep nets (E7–E10) -----


# Top row of a deep-net figure: (metric key, title, scale, log-scale y); the second row has one panel per block.
DEEP_NET_PANELS = [("lr", "step size η (log scale)", 1, True), ("train_loss", "train loss (log scale)", 1, True),
                   ("train_error", "train error (%)", 100, False), ("test_error", "test error (%)", 100, False)]


def deep_decay_epochs(config):
    """Epochs at which a piecewise schedule divides its step size (utils.deep_step_size): ÷10 at T·E, ÷100 at 0.9·E."""
    if config.get("lr_schedule") != "piecewise":
        return []
    return [config["large_lr_frac"] * config["epochs"], 0.9 * config["epochs"]]


def _deep_step_size_curve(ax, line, color, style):
    """The step size of every SGD step of a line, from its config through utils.deep_step_size (the function the
    training scripts call before each step, so the curve cannot drift from the trainer), up to the last iteration its
    seeds logged; the step sizes the logs recorded at their evaluations are drawn on it as dots, a visible check."""
    config = line.logs[0]["config"]
    longest = max(line.logs, key=lambda log: log["history"][-1]["iter"] if log["history"] else -1)
    logged = [(rec["epoch"], rec["lr"]) for rec in longest["history"] if rec.get("lr") is not None]
    if config.get("steps_per_epoch") and longest["history"]:
        steps = np.arange(longest["history"][-1]["iter"] + 1)
        epochs = steps / config["steps_per_epoch"]
        lrs = [utils.deep_step_size(epoch, config["epochs"], config["lr"], config["lr_schedule"],
                                    config["warmup_exp"], config["large_lr_frac"]) for epoch in epochs]
        ax.plot(epochs, lrs, color=color, drawstyle="steps-post", **style)
    if logged:
        ax.plot(*zip(*logged), color=color, linestyle="none", marker=".", markersize=4)


def _deep_net_title(experiment, script, logs):
    """The configuration shared by all runs of the figure; a key on which they disagree is left out here and named
    in the legend instead (plot_lines)."""
    mixed = object()

    def common(key):
        return common_config(logs, key, mixed)

    if script == "train_densenet":
        depth, growth = common("depth"), common("growth_rate")
        model = "DenseNet-BC" + (f"-{depth}" if depth is not mixed else "")
        model += f" (growth rate {growth})" if growth is not mixed else ""
    else:
        width = common("width")
        model = "ResNet-18" + (f" (width {width})" if width is not mixed else "")
    parts = [model]
    dataset = common("dataset")
    if dataset is not mixed:
        parts.append(utils.IMAGE_SOURCES.get(dataset, {}).get("title", dataset))
    for key, text in [("n_train", "{:,} training images"), ("batch_size", "batch {}"), ("epochs", "{} epochs")]:
        value = common(key)
        if value is not mixed:
            parts.append(text.format(value).replace(",", " "))
    extras = [("momentum", "momentum {:g}"), ("weight_decay", "weight decay {:g}"), ("augment", "augmentation")]
    values = {key: common(key) for key, _ in extras}
    if all(value is not mixed and _is_off(value) for value in values.values()):
        parts.append("plain SGD (no momentum, weight decay or augmentation)")
    parts += [text.format(values[key]) for key, text in extras if values[key] is not mixed and not _is_off(values[key])]
    notes = "density: solid = de-duplicated, dotted = raw; dashed vertical lines = step-size decays"
    examples = common("sparsity_examples_used")
    notes += "; train loss/error in eval mode" + (f" on the first {examples:,} training images".replace(",", " ")
                                                   if examples is not mixed and examples else "")
    return f"{experiment}: {', '.join(parts)}\n{notes}"


# What one deep-net figure compares: runs whose configuration differs only in these keys (the step-size schedule and
# label noise) and the seed share a setting (model, data, budget, optimiser) and are drawn, tabulated and checked
# against the paper's claims together.
COMPARED_KEYS = frozenset({"lr", "lr_schedule", "warmup_exp", "large_lr_frac", "label_noise"})


def _setting_suffix(key, value):
    """'_epochs8', '_weight-decay0.0005', '_augment' / '_no-augment': one key of a figure name."""
    key = key.replace("_", "-")
    if isinstance(value, bool):
        return f"_{key}" if value else f"_no-{key}"
    return f"_{key}{_shown_value(value)}"


def deep_settings(experiment, logs):
    """The logs of one deep-net experiment split by setting (equal configuration except COMPARED_KEYS and the
    seed), as {figure name: logs}. The setting with the most logs (the first of them on a tie) is named after the
    experiment; every other one adds the keys in which it differs from that setting, e.g.
    'resnet18_cifar10_epochs25_eval-every39' (so adding logs can move a name to another setting: redraw into a clean
    folder). That setting comes first. One setting: {experiment: logs}."""
    settings = collections.OrderedDict()
    for log in logs:
        setting = {key: value for key, value in experiment_config(log).items() if key not in COMPARED_KEYS}
        settings.setdefault(json.dumps(setting, sort_keys=True), []).append(log)
    main = max(settings, key=lambda key: len(settings[key]))  # the first of the largest
    reference = json.loads(main)
    named = collections.OrderedDict()
    for key in sorted(settings, key=lambda key: key != main):  # the experiment's own name first
        group = settings[key]
        setting = json.loads(key)
        differs = [name for name in sorted(set(setting) | set(reference)) if setting.get(name) != reference.get(name)]
        suffix = "".join(_setting_suffix(name, setting.get(name, False)) for name in differs)
        if experiment + suffix in named:  # values equal in their shown form (6 significant digits)
            raise ValueError(f"two settings of {experiment} would share the figure name {experiment + suffix!r}")
        named[experiment + suffix] = group
    return named


def draw_deep_net(experiment, logs, out_dir):
    """Figure 1 of the paper for one model × data set, against epochs, one colour per line: step size, train loss,
    train error, test error, and per block the feature density (de-duplicated solid, raw dotted); dashed vertical
    lines at each line's step-size decays on every panel; the configuration in the title, what differs between
    lines in the legend. Logs with `sharpness` records add a sharpness panel (draw_sharpness) to the top row."""
    blocks = list(collections.OrderedDict.fromkeys(block for log in logs for block in log["config"].get("blocks", [])))
    top = DEEP_NET_PANELS + ([(SHARPNESS_PANEL[0], SHARPNESS_PANEL[1], 1, True)] if has_sharpness(logs) else [])
    n_cols = max(len(top), len(blocks))
    fig, axes = new_figure(2, n_cols, (3.6 * n_cols, 6.4))
    panels = [(axes[0, col], *panel) for col, panel in enumerate(top)]
    panels += [(axes[1, col], block, f"{block}: feature density (%)", 100, False) for col, block in enumerate(blocks)]
    handles = []
    lines = plot_lines(logs)
    for color_index, line in enumerate(lines):
        color = f"C{color_index % 10}"
        style = dict(UNFINISHED_STYLE) if line.unfinished else {}
        seeds = f" ({len(line.logs)} seeds)" if len(line.logs) > 1 else ""
        handles.append(matplotlib.lines.Line2D([], [], color=color, label=line.label + seeds, **style))
        for ax, key, title, scale, log_scale in panels:
            if key == "lr":
                _deep_step_size_curve(ax, line, color, style)
            elif key == "sharpness":  # its records may lack the other metrics: other panels skip records without theirs
                draw_sharpness(ax, line.logs, color, "epoch", **style)
            elif key in blocks:
                plot_metric(ax, line.logs, f"density_dedup_{key}", None, "epoch", color, scale, **style)
                plot_metric(ax, line.logs, f"density_{key}", None, "epoch", color, scale,
                            **dict(style, linestyle=":", alpha=0.7))
            else:
                plot_metric(ax, line.logs, key, None, "epoch", color, scale, **style)
            if key != "sharpness":
                draw_decay_lines(ax, deep_decay_epochs(line.logs[0]["config"]), color)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("epoch")
            if log_scale:
                ax.set_yscale("log")
                # plain numbers (0.01, 2, 10), also on the minor ticks matplotlib labels when a panel spans less
                # than a decade, instead of 10^-2 and 2×10^0
                ax.yaxis.set_major_formatter(PlainLogFormatter())
                ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))
    for ax in axes.flat[len(top):n_cols]:
        ax.axis("off")
    for ax in axes[1, len(blocks):]:
        ax.axis("off")
    n_legend_cols = min(2, len(handles))
    fig.legend(handles=handles, loc="lower center", ncol=n_legend_cols, fontsize=8)
    fig.suptitle(_deep_net_title(experiment, logs[0]["script"], logs), fontsize=10)
    legend_rows = -(-len(handles) // n_legend_cols)
    fig.tight_layout(rect=(0, 0.012 + 0.032 * legend_rows, 1, 1))  # room for the legend rows below the panels
    return [save_figure(fig, out_dir, experiment)]


def draw_deep_net_settings(experiment, logs, out_dir):
    """One draw_deep_net figure per setting of the experiment (deep_settings)."""
    return [path for name, group in deep_settings(experiment, logs).items()
            for path in draw_deep_net(name, group, out_dir)]


DRAWERS["train_resnet"] = draw_deep_net_settings
DRAWERS["train_densenet"] = draw_deep_net_settings


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


def toy_decay_iterations(config):
    """The decay point of a toy run: its last large-step iteration ⌊T·N⌋, logged by both toy scripts as
    config.decay_iter (none for constant runs)."""
    return [] if config.get("decay_iter") is None else [config["decay_iter"]]


# Line style of a run whose seeds ALL diverged (both toy drawers): dash-dot, with an × at the last finite evaluation.
TOY_ALL_DIVERGED_STYLE = {"linestyle": "-.", "marker": "x", "markevery": [-1]}


def _toy_seeds_to_draw(line):
    """How both toy drawers treat diverged seeds (large-step runs sit at the edge of divergence): returns
    (legend label, logs to draw, extra line style) of a Line.

    Diverged seeds stay out of the median and the min–max band (their blow-up would stretch the band over tens of
    decades) and are counted in the label instead, '[3/16 diverged]'. A run whose seeds all diverged is drawn from
    those seeds, up to their divergence, in TOY_ALL_DIVERGED_STYLE, so it cannot be mistaken for a surviving run;
    an unfinished run (a line of its own) in UNFINISHED_STYLE.
    """
    label, runs = line.label, line.logs
    kept = [log for log in runs if log["status"] != "diverged"]
    if len(kept) < len(runs):
        label = f"{label} [{len(runs) - len(kept)}/{len(runs)} diverged]"
    style = dict(UNFINISHED_STYLE) if line.unfinished else {} if kept else dict(TOY_ALL_DIVERGED_STYLE)
    return label, kept or runs, style


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
    against iterations, one colour per run, dashed lines at the decay points, and the sharpness (draw_sharpness) when
    the logs have it; plus the E5 neuron-movement figure."""
    preset = logs[0]["config"]["preset"]
    panels = RELU_TOY_PANELS[preset] + ([SHARPNESS_PANEL] if has_sharpness(logs) else [])
    fig, axes = new_figure(1, len(panels), (3.9 * len(panels), 3.4))
    for color_index, line in enumerate(plot_lines(logs)):
        color = f"C{color_index % 10}"
        label, drawn, style = _toy_seeds_to_draw(line)
        for ax, (key, title, log_scale) in zip(axes.flat, panels):
            ax.set_title(title, fontsize=10)
            if key == "function":
                _relu_learned_function(ax, drawn, label, color)
                ax.set_xlabel("x")
                continue
            if key == "sharpness":
                draw_sharpness(ax, drawn, color, **style)
                ax.set_xlabel("iteration")
                ax.set_yscale("log")
                continue
            if key.startswith("density_"):
                dedup_key = key.replace("density_", "density_dedup_", 1)
                plot_metric(ax, drawn, dedup_key, label, color=color, scale=100, **style)
                plot_metric(ax, drawn, key, None, color=color, scale=100, **dict(style, linestyle=":", alpha=0.7))
            else:
                plot_metric(ax, drawn, key, label, color=color, **style)
            draw_decay_lines(ax, toy_decay_iterations(line.logs[0]["config"]), color)
            ax.set_xlabel("iteration")
            if log_scale:
                ax.set_yscale("log")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{experiment}: density solid = de-duplicated, dotted = raw; dashed lines = decay points",
                 fontsize=10)
    fig.tight_layout()
    written = [save_figure(fig, out_dir, experiment)]
    if preset == "e5" and common_config(logs, "input_dim") == 2:  # the neuron picture is the input plane (d = 2)
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
    """E5 neuron movement: one panel per line (plot_lines), from its lowest seed that has neuron data (diverged
    seeds have none)."""
    lines = plot_lines(logs)
    fig, axes = new_figure(1, len(lines), (3.6 * len(lines), 3.9))
    for ax, line in zip(axes.flat, lines):
        with_data = [log for log in line.logs if log.get("neurons")] or line.logs
        log = min(with_data, key=lambda item: item.get("seed", 0))
        ax.set_title(f"{line.label}\nseed {log.get('seed')}", fontsize=9)
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
    per run, median and min–max band over its non-diverged seeds, dashed lines at the decay iterations ⌊T·N⌋; and
    the sharpness against 2/η (draw_sharpness) when the logs have it."""
    panels = DIAG_NET_PANELS + ([SHARPNESS_PANEL] if has_sharpness(logs) else [])
    fig, axes = new_figure(1, len(panels), (3.9 * len(panels), 3.4))
    for color_index, line in enumerate(plot_lines(logs)):
        color = f"C{color_index % 10}"
        label, drawn, style = _toy_seeds_to_draw(line)
        for ax, (key, title, log_scale) in zip(axes[0], panels):
            if key == "sharpness":
                draw_sharpness(ax, drawn, color, **style)
            else:
                plot_metric(ax, drawn, key, label, color=color, **style)
                draw_decay_lines(ax, toy_decay_iterations(line.logs[0]["config"]), color)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("iteration")
            if log_scale:
                ax.set_yscale("log")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8)
    sizes = [f"{symbol} = {common_config(logs, key)}" for symbol, key in
             [("n", "n_train"), ("d", "input_dim"), ("r", "support_size")] if common_config(logs, key) is not None]
    fig.suptitle(f"{experiment}: diagonal linear net, {', '.join(sizes)}; dashed lines = decay points", fontsize=10)
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
    for color_index, line in enumerate(plot_lines(logs)):
        label, runs = line.label, line.logs
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
# Tables: the README's results tables, printed from the logs (python plots.py --logs results --table)
# ======================================================================================================================

# The authors' printed numbers (their notebooks' outputs, the values behind the paper's toy figures, arXiv 2210.05337
# Figures 2-3 and Appendix C), at their seed, as {experiment: (seed, {run_index: {metric: value}})}.
PAPER_TOY_NUMBERS = {
    "e1": (1, {0: {"train_loss": 1.4216e-06, "test_loss": 3.5286e-03, "l0": 200},
               1: {"train_loss": 6.2558e-05, "test_loss": 6.5941e-04, "l0": 156},
               2: {"train_loss": 5.9754e-05, "test_loss": 2.8474e-04, "l0": 89},
               3: {"train_loss": 6.6990e-05, "test_loss": 1.5373e-04, "l0": 71}}),
    "e2": (None, {4: {"test_loss": 0.0385, "l0": 33}}),  # read off the paper's figure; its seed is not known
    "e4": (3, {0: {"train_loss": 2.0859e-04}, 1: {"train_loss": 1.690e-04}}),
    "e5": (0, {0: {"train_loss": 1.3538e-05, "test_loss": 6.0982e-04},
               1: {"train_loss": 1.019e-05, "test_loss": 1.622e-04},
               2: {"train_loss": 1.120e-05, "test_loss": 1.382e-04},
               3: {"train_loss": 1.113e-05, "test_loss": 5.411e-05}}),
    "e6": (5, {0: {"train_loss": 1.371e-03, "test_loss": 0.061388}, 1: {"train_loss": 1.097e-03, "test_loss": 0.032181},
               2: {"train_loss": 1.005e-03, "test_loss": 0.024772}, 3: {"train_loss": 1.061e-03, "test_loss": 0.020578}}),
}
# The metrics each toy table shows: the loss the paper compares, and the sparsity.
TOY_TABLE_METRICS = {
    "e1": [("test_loss", "test loss"), ("l0", "‖β‖₀")],
    "e2": [("test_loss", "test loss"), ("l0", "‖β‖₀")],
    "e4": [("train_loss", "train loss"), ("density_dedup_layer1", "dedup. density"), ("rank", "rank")],
    "e5": [("test_loss", "test loss"), ("density_dedup_layer1", "dedup. density")],
    "e6": [("test_loss", "test loss"), ("density_dedup_layer1", "dedup. density L1"),
           ("density_dedup_layer2", "dedup. density L2")],
}


def _number(value):
    """A table cell for one number: 4 significant digits, densities and counts as they are logged."""
    return "–" if value is None else f"{value:.4g}"


def _summary(logs):
    """utils.seed_summary over ALL these logs of one run (however many invocations wrote them), seeds in order."""
    logs = sorted(logs, key=lambda log: (log["seed"] is not None, log["seed"] or 0))
    return utils.seed_summary([log["seed"] for log in logs], [log["status"] for log in logs],
                              [log["final"] for log in logs])


def _distribution(summary, key):
    """'median [lo, hi]' of `key` over the completed seeds (bootstrap 90 % interval), or '–'."""
    if not summary["median_final"] or key not in summary["median_final"]:
        return "–"
    return utils.format_median_ci(summary, key)


def _diverged(summary):
    """'k/n' diverged seeds of a run."""
    return f"{len(summary['diverged_seeds'])}/{len(summary['seeds'])}"


def _outcomes(logs):
    """{seed: (status, final)} of one run's logs, for utils.later_decay_wins."""
    return {log["seed"]: (log["status"], log["final"]) for log in logs}


def toy_table(experiment, logs, jitter_logs):
    """Markdown table of one toy experiment: per run and metric, the paper's number at its seed, ours at that seed,
    ours over all seeds (median [bootstrap 90 % interval], diverged k/n, in how many seeds a later decay beat the
    earlier one), and the spread over --init-jitter runs of the paper's seed (median [interval], min–max)."""
    paper_seed, paper = PAPER_TOY_NUMBERS.get(experiment, (None, {}))
    runs = collections.OrderedDict()
    for log in sorted(logs, key=lambda log: log.get("run_index", 0)):
        runs.setdefault(log["run_index"], []).append(log)
    jitter = collections.defaultdict(list)
    for log in jitter_logs:
        jitter[log["run_index"]].append(log)
    seeds = sorted({log["seed"] for log in logs if log["seed"] is not None})
    seed_range = f"seeds {seeds[0]}–{seeds[-1]}" if seeds else "deterministic"
    at_seed = "" if paper_seed is None else f" (seed {paper_seed})"
    jitter_size = jitter_logs[0].get("config", {}).get("init_jitter") if jitter_logs else None
    epsilon = f"{jitter_size:g} " if jitter_size else ""
    rows = [f"| run | metric | paper{at_seed} | ours{at_seed} | ours, {seed_range}: median "
            f"[90 % CI] | diverged | later decay lower | ours, {epsilon}init jitter: median [90 % CI] (min – max) |",
            "|---|---|---|---|---|---|---|---|"]
    previous = None
    for run_index, run_logs in runs.items():
        at_paper_seed = next((log for log in run_logs if log["seed"] == paper_seed), None)
        summary = _summary(run_logs)
        stored = run_logs[0].get("vs_earlier_decay")  # the script decided this run is compared with the previous one
        wins = utils.later_decay_wins(_outcomes(previous), _outcomes(run_logs), stored["metric"]) if stored else None
        previous = run_logs
        for metric, name in TOY_TABLE_METRICS[experiment]:
            ours = "–"
            if at_paper_seed is not None and paper_seed is not None:
                ours = "diverged" if at_paper_seed["status"] == "diverged" else \
                    _number(at_paper_seed["final"].get(metric))
            won = f"{wins['wins']}/{wins['pairs']}" if wins and wins["metric"] == metric else ""
            spread = "–"
            jittered = jitter.get(run_index, [])
            done = [log["final"][metric] for log in jittered if log["status"] == "completed"
                    and log["final"].get(metric) is not None]
            if done:
                jitter_summary = _summary(jittered)
                spread = f"{_distribution(jitter_summary, metric)} ({min(done):.4g} – {max(done):.4g})"
                spread += f", diverged {_diverged(jitter_summary)}"
            rows.append(f"| {run_logs[0]['run']} | {name} | {_number(paper.get(run_index, {}).get(metric))} | {ours} "
                        f"| {_distribution(summary, metric)} | {_diverged(summary)} | {won} | {spread} |")
    return "\n".join(rows)


def _mean_std(values, scale=1.0, digits=1):
    """'mean ± std' (sample std over seeds; the mean alone for one seed)."""
    values = np.asarray(values, dtype=np.float64) * scale
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def deep_table(logs):
    """Markdown table of one deep-net setting (deep_settings): per line of its figure (a run over its seeds), the final
    training error, test error and the de-duplicated density of the last two blocks (mean ± std over seeds, in %),
    and the wall time of one run."""
    blocks = logs[0]["config"]["blocks"][-2:]
    rows = [f"| run | seeds | train error (%) | test error (%) | "
            + " | ".join(f"{block} dedup. density (%)" for block in blocks) + " | minutes per run |",
            "|---|---|---|---|" + "---|" * len(blocks) + "---|"]
    for line in plot_lines(logs):
        done = [log for log in line.logs if log["status"] == "completed"]
        if not done:
            rows.append(f"| {line.label} | {len(line.logs)} | {line.logs[0]['status']} |" + " |" * (len(blocks) + 2))
            continue
        finals = [log["final"] for log in done]
        cells = [_mean_std([f["train_error"] for f in finals], 100, digits=2),  # fitted runs end at ≤ 1 %
                 _mean_std([f["test_error"] for f in finals], 100)]
        cells += [_mean_std([f[f"density_dedup_{block}"] for f in finals], 100) for block in blocks]
        minutes = np.median([f["wall_time"] for f in finals]) / 60
        diverged = len(line.logs) - len(done)
        seeds = f"{len(done)}" + (f" (+{diverged} diverged)" if diverged else "")
        rows.append(f"| {line.label} | {seeds} | " + " | ".join(cells) + f" | {minutes:.1f} |")
    return "\n".join(rows)


# The paper's claims on deep networks (main text, Figure 1): (claim, final metric the claim expects lower, its name).
DEEP_CLAIM_METRICS = [("sparser features", "density_dedup_{block}", "{block} dedup. density (%)"),
                      ("lower test error", "test_error", "test error (%)")]


# A run fits its training set when its final training error is at most this: the protocol's condition for comparing
# test errors (README, Deep networks); a comparison with a run that does not fit is flagged.
FIT_TRAIN_ERROR = 0.01


def _completed_finals(line, key):
    """`key` of the final record of each completed seed of a line that logged it."""
    return [log["final"][key] for log in line.logs
            if log["status"] == "completed" and log["final"].get(key) is not None]


def _seed0_train_loss(line):
    return next((log["final"]["train_loss"] for log in line.logs
                 if log["status"] == "completed" and log["seed"] == 0), None)


def _seeds_shown(line):
    """'3' completed seeds, or '2, +1 diverged'."""
    done = sum(log["status"] == "completed" for log in line.logs)
    diverged = sum(log["status"] == "diverged" for log in line.logs)
    return f"{done}" + (f", +{diverged} diverged" if diverged else "")


def _claim_row(claim, lower_line, higher_line, key, unit):
    """One row of deep_claims: `lower_line` is expected to end with the lower `key`. The verdict is
    utils.seed_noise_verdict's, with the difference in standard errors; a side that does not fit its training set
    (mean final training error above FIT_TRAIN_ERROR) is named after it."""
    lower, higher = (_completed_finals(line, key) for line in (lower_line, higher_line))
    ours = " vs ".join(_mean_std(values, 100) if values else "–" for values in (lower, higher))
    if min(len(lower), len(higher)) < 2:
        verdict = f"none yet: needs ≥ 2 completed seeds each (has {len(lower)} and {len(higher)})"
    else:
        verdict, difference, error = utils.seed_noise_verdict(lower, higher)
        ratio = f", {difference / error:.1f} standard errors" if error > 0 else ""
        verdict = f"**{verdict}** (difference {100 * difference:.1f}{ratio})"
    for line in (lower_line, higher_line):
        errors = _completed_finals(line, "train_error")
        if errors and np.mean(errors) > FIT_TRAIN_ERROR:
            verdict += f"; confounded: {line.label} does not fit ({100 * np.mean(errors):.1f} % training error)"
    compared = f"{lower_line.label} ({_seeds_shown(lower_line)}) vs {higher_line.label} ({_seeds_shown(higher_line)})"
    return f"| {claim} | {unit} | {compared} | {ours} | {verdict} |"


def deep_claims(name, logs):
    """The paper's claims on deep networks checked on the logs of one setting (deep_settings; label-noise runs left
    out): (1) a decayed large-step schedule ends with sparser features in the last two blocks and (2) a lower test
    error than the constant-step baseline, (3) the longer its large-step phase (T), the stronger both. Decayed runs
    are grouped by η0 and warmup: (1) and (2) use each group's longest T, (3) compares consecutive T of a group. The
    baseline is the constant step with the lowest final training loss at seed 0 (the tuning rule; ties: the first).
    Verdicts: utils.seed_noise_verdict over the completed seeds of the two lines compared. A setting without a
    decayed run is not checked (''); one without a constant run at seed 0 gets a line saying so."""
    blocks = logs[0]["config"]["blocks"][-2:]
    lines = [line for line in plot_lines([log for log in logs if not log["config"].get("label_noise")])
             if not line.unfinished]
    constant = [line for line in lines if line.logs[0]["config"]["lr_schedule"] == "constant"
                and _seed0_train_loss(line) is not None]
    groups = collections.OrderedDict()  # (η0, warmup) -> its decayed lines in order of T
    for line in lines:
        config = line.logs[0]["config"]
        if config["lr_schedule"] != "constant":
            groups.setdefault((config["lr"], config["warmup_exp"]), []).append(line)
    if not groups:
        return ""
    if not constant:
        return f"**Claims of the paper, {name}**: not checked, no constant-step run with seed 0 to compare with."
    baseline = min(constant, key=_seed0_train_loss)
    tuning = ", ".join(f"{line.label}: {_seed0_train_loss(line):.4f}" for line in constant)
    rows = [f"**Claims of the paper, {name}** — baseline: {baseline.label}, the constant step with the lowest final "
            f"training loss at seed 0 ({tuning})", "",
            "| claim | metric | lower expected vs higher expected (seeds) | ours, mean ± std | verdict |",
            "|---|---|---|---|---|"]
    for decayed in groups.values():
        decayed.sort(key=lambda line: line.logs[0]["config"]["large_lr_frac"])
        for claim, key, unit in DEEP_CLAIM_METRICS:
            for block in blocks if "{block}" in key else [None]:
                rows.append(_claim_row(claim, decayed[-1], baseline, key.format(block=block),
                                       unit.format(block=block)))
        for shorter, longer in zip(decayed, decayed[1:]):
            for claim, key, unit in DEEP_CLAIM_METRICS:
                for block in blocks[-1:] if "{block}" in key else [None]:
                    rows.append(_claim_row(f"longer large-step phase, {claim}", longer, shorter,
                                           key.format(block=block), unit.format(block=block)))
    return "\n".join(rows)


def deep_sharpness_table(log):
    """Markdown table of one deep-net run's sharpness measurements (--sharpness-every): per measurement the epoch,
    η, 2/η, λ_max, λ_max·η/2 (above 1 = sharper than the stability threshold 2/η), the Hessian-vector products it
    took, and the train loss and last block's de-duplicated density where the measurement shares its record with an
    evaluation (as when --sharpness-every equals --eval-every)."""
    block = log["config"]["blocks"][-1]
    rows = [f"| epoch | η | 2/η | λ_max | λ_max·η/2 | Hessian-vector products | train loss | {block} dedup. density (%) |",
            "|---|---|---|---|---|---|---|---|"]
    for record in log["history"]:
        if record.get("sharpness") is None:
            continue
        density = record.get(f"density_dedup_{block}")
        rows.append(f"| {record['epoch']:g} | {record['lr']:.3g} | {2 / record['lr']:.3g} | {record['sharpness']:.3g} "
                    f"| {record['sharpness'] * record['lr'] / 2:.2f} | {record.get('sharpness_hvps', '–')} "
                    f"| {_number(record.get('train_loss'))} | {'–' if density is None else f'{100 * density:.1f}'} |")
    return "\n".join(rows)


def shown_command(log):
    """The command that wrote a log (env.command), with a run of consecutive --seeds written as $(seq a b)."""
    words = log.get("env", {}).get("command", "").split()
    if "--seeds" in words:
        start = words.index("--seeds") + 1
        end = start
        while end < len(words) and words[end].isdigit():
            end += 1
        seeds = [int(word) for word in words[start:end]]
        if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
            words[start:end] = [f"$(seq {seeds[0]} {seeds[-1]})"]
    return "python " + " ".join(words)


def results_tables(logs):
    """Every results table of the README, in order: the toy experiments (E1, E2, E4-E6), then each deep-net
    experiment; each table preceded by a one-line heading naming its logs."""
    by_experiment = collections.defaultdict(list)
    for log in logs:
        by_experiment[log.get("experiment", log["script"])].append(log)
    sections = []
    for experiment in TOY_TABLE_METRICS:
        if by_experiment.get(experiment):
            jitter = by_experiment.get(f"{experiment}_jitter", [])
            commands = f"`{shown_command(by_experiment[experiment][0])}`"
            if jitter:
                commands += f"; jitter: `{shown_command(jitter[0])}`"
            sections.append(f"**{experiment.upper()}** — {commands}\n\n"
                            + toy_table(experiment, by_experiment[experiment], jitter))
    for experiment, group in sorted(by_experiment.items()):
        if group[0]["script"] in ("train_resnet", "train_densenet"):
            for name, setting in deep_settings(experiment, group).items():
                title = _deep_net_title(name, setting[0]["script"], setting).splitlines()[0]
                sections.append(f"**{title}** (commands: `env.command` of each log in `results/deep/`):\n\n"
                                + deep_table(setting))
                claims = deep_claims(name, setting)
                if claims:
                    sections.append(claims)
                for log in setting:
                    if log["status"] == "completed" and has_sharpness([log]):
                        sections.append(f"**Sharpness of {log['run']}, seed {log['seed']}** ({name}; "
                                        f"`--sharpness-every {log['config']['sharpness_every']}`)\n\n"
                                        + deep_sharpness_table(log))
    return "\n\n".join(sections)


# ======================================================================================================================
# Entry point
# ======================================================================================================================


def main(argv=None):
    parser = utils.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", nargs="+", default=["runs"],
                        help="folders searched recursively for JSON run logs")
    parser.add_argument("--out-dir", default="figures", help="folder the PNG figures are written to")
    parser.add_argument("--table", action="store_true",
                        help="print the README's results tables (markdown) from the logs instead of drawing figures")
    args = parser.parse_args(argv)
    for folder in args.logs:
        if not os.path.isdir(folder):
            utils.usage_error("--logs", f"{folder!r} is not a folder; pass the --out-dir of your runs")
    logs = [log for folder in args.logs for log in load_logs(folder)]
    if not logs:
        utils.usage_error("--logs", f"no run logs found under {' '.join(args.logs)}; run an experiment first")
    if args.table:
        print(results_tables(logs))
        return []
    utils.prepare_out_dir(args.out_dir)
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
