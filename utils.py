"""Shared pieces of the "SGD with Large Step Sizes Learns Sparse Features" reproduction kit.

Everything an experiment script needs besides its own model lives here, so that copying an experiment out of this
repository means copying the script and this file. Imports: the standard library, numpy and torch only.

Sections: command line & errors | seeding & environment | JSON run logs | metrics (SPEC §1) | schedules (SPEC §2).
Section numbers (SPEC §x, Ex) refer to ../shared/SPEC.md, which summarises the paper's definitions.
"""
import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import pickle
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import typing

import numpy as np
import torch

# ======================================================================================================================
# Command line & errors
# ======================================================================================================================


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show each flag's default, except where the help text already explains it or there is none (None/False)."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default is None or action.default is False:  # not 0 == False
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `prog: error: argument --lr: ... (see --help)`, exit code 2.

    The stock parser prints the whole usage block first; a researcher scanning a sweep's stderr wants one line that
    names the flag.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # `--lr` must never silently match `--lr-schedule`
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def usage_error(flag, message):
    """Stop with a one-line usage error naming `flag` and exit code 2 (for checks argparse cannot express)."""
    prog = os.path.basename(sys.argv[0]) or "python"
    sys.stderr.write(f"{prog}: error: argument {flag}: {message}\n")
    raise SystemExit(2)


def _number_type(cast, check, requirement):
    """Build an argparse `type=` callable that casts, validates and explains the requirement when it fails."""

    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {requirement}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {requirement}, got {text!r}")
        return value

    parse.__name__ = requirement  # argparse shows this name in some messages
    return parse


positive_float = _number_type(float, lambda v: math.isfinite(v) and v > 0, "a number > 0")
nonnegative_float = _number_type(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
fraction = _number_type(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
positive_int = _number_type(int, lambda v: v > 0, "an integer >= 1")
nonnegative_int = _number_type(int, lambda v: v >= 0, "an integer >= 0")


def prepare_out_dir(path, flag="--out-dir"):
    """Create the output folder at start-up and prove it is writable, so a long run never fails at its first save."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        usage_error(flag, f"cannot write to {path!r} ({err.strerror or err}); pass a writable folder")
    return path


# ======================================================================================================================
# Seeding & environment
# ======================================================================================================================


def seed_everything(seed):
    """Seed python, numpy's legacy global generator and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name, flag="--device"):
    """Map `auto|cpu|cuda|mps` to a torch.device; `auto` prefers CUDA, then Apple MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        usage_error(flag, "CUDA was requested but torch sees no CUDA device; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        usage_error(flag, "MPS was requested but is not available; use --device cpu or auto")
    return torch.device(name)


def _git_commit():
    """The repository's commit hash, or None outside a git checkout (e.g. after copying a script elsewhere)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def environment_info(device=None):
    """Versions and hardware, stored in every log so that a number can be traced to where it was produced."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


# ======================================================================================================================
# JSON run logs
# ======================================================================================================================

RUN_STATUSES = ("running", "completed", "diverged", "interrupted", "failed")


def to_jsonable(value):
    """Convert numpy/torch scalars and arrays to plain JSON; non-finite floats become null (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _encode_json(obj):
    """Strict JSON text of `obj` (after to_jsonable); json.dumps uses the C encoder, json.dump a slow pure-Python one."""
    return json.dumps(to_jsonable(obj), allow_nan=False, separators=(",", ":"))


def _write_text_atomic(path, text):
    """Write `text` to a temp file in the same folder, then rename it over `path` (atomic within a file system).

    A reader, a crash of the run or Ctrl-C only ever sees the old complete file or the new complete file. No fsync:
    toy runs rewrite their logs hundreds of times a second and an fsync costs 5-10 ms; ext4 and similar file systems
    flush a file's data before a rename that replaces another file, so even an OS crash leaves a complete version.
    """
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path, obj):
    """Write `obj` as strict JSON (NaN/inf -> null) atomically: temp file + rename (see _write_text_atomic)."""
    _write_text_atomic(path, _encode_json(obj))


class RunLog:
    """One JSON log per run: script, config, env, status, history (one record per evaluation, with `iter`), final.

    The file is rewritten atomically after every `record`, so the log on disk is always valid JSON that contains
    everything measured so far. Each record is encoded once, when it is added, so a save costs little more than the
    file write even for long histories. Use as a context manager: Ctrl-C marks the run `interrupted`, any other
    exception `failed` (with the error message), and both still save the log before the exception propagates.
    Add records with `record` (not by editing `data["history"]`, which is kept for reading).
    """

    def __init__(self, path, script, config, env=None, history=None, **extra):
        """Start (and save) the log; `history` carries the records of an earlier part of a resumed run."""
        self.path = path
        history = list(history or [])
        self.data = {"script": script, "config": dict(config), "env": env or environment_info(),
                     "status": "running", "history": history, "final": history[-1] if history else None, **extra}
        self._encoded_history = [_encode_json(record) for record in history]
        self.save()

    def record(self, **metrics):
        """Append one evaluation record (must contain `iter`) and save."""
        if "iter" not in metrics:
            raise ValueError("every history record needs an 'iter' key")
        self.data["history"].append(metrics)
        self.data["final"] = metrics
        self._encoded_history.append(_encode_json(metrics))
        self.save()

    def finish(self, status="completed", **extra):
        """Set the final status (one of RUN_STATUSES), attach any extra top-level results, and save."""
        if status not in RUN_STATUSES:
            raise ValueError(f"unknown status {status!r}")
        self.data["status"] = status
        self.data.update(extra)
        self.save()

    def save(self):
        """Rewrite the whole log atomically: the other keys, then the pre-encoded history and final record."""
        rest = _encode_json({k: v for k, v in self.data.items() if k not in ("history", "final")})
        final = self._encoded_history[-1] if self._encoded_history else "null"
        _write_text_atomic(self.path, f'{rest[:-1]},"history":[{",".join(self._encoded_history)}],"final":{final}}}')

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if self.data["status"] == "running":
                self.finish("completed")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("interrupted")
        else:
            self.finish("failed", error=f"{exc_type.__name__}: {exc}")
        return False


def run_slug(**parts):
    """A file-name-safe run name from key/value parts: run_slug(lr=0.25, decay=None) -> 'lr0.25'.

    No spaces and no '=' (shell- and glob-friendly); None/False parts are skipped, True parts keep only their key.
    """
    pieces = []
    for key, value in parts.items():
        if value is None or value is False:
            continue
        pieces.append(key if value is True else f"{key}{value:g}" if isinstance(value, float) else f"{key}{value}")
    slug = "_".join(pieces) or "run"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in slug)


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


def format_seconds(seconds):
    """Human-readable duration: 42s, 3m05s, 2h07m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


# ======================================================================================================================
# Metrics (SPEC §1)
# ======================================================================================================================

# Correlations are bounded and computed in float32 (fast matrix products) with proven error bounds; any pair whose
# float32 |correlation| lies within the error margin of the threshold is recomputed in float64, so the kept set equals
# that of an exact float64 computation (see duplicate_columns).
_CORR_RECHECK_MARGIN = 1e-3  # smallest half-width of the band around τ that is decided in float64
_CORR_BLOCK = 256  # columns per block of the upper-triangular correlation pass
_SUM_CHUNK = 16  # float32 partial sums run over at most 16 rows (rounding error ≤ γ_16 ≈ 1e-6), then float64
_SUM_SLAB = 2 ** 22  # elements per slab of rows squared at once (16 MB: reused memory, no page faults)
_FLOAT32_ROUNDOFF = 2.0 ** -24  # unit roundoff u of float32
_MAX_COLUMN_ERROR = 1e-4  # columns whose float32 standardisation error bound exceeds this are standardised in float64


def _as_activation_matrix(phi):
    """N×... numpy array or tensor -> float N×M tensor (trailing dims flattened: one neuron per channel×position)."""
    phi = torch.as_tensor(phi)
    if phi.dim() < 2:
        raise ValueError(f"feature_sparsity expects an N×M activation matrix, got shape {tuple(phi.shape)}")
    phi = phi.reshape(phi.shape[0], -1)
    return phi if phi.is_floating_point() else phi.float()


def _standardized_columns(x):
    """Centre each column and scale it to unit L2 norm, in float64 (Pearson correlation = dot product of such columns).

    Columns with zero variance (detected exactly, as max == min) have an undefined (NaN) correlation; they are returned
    as all-zero columns, whose dot product with anything is 0, so they never delete and are never deleted.
    """
    x = x.double()
    constant = x.amax(dim=0) == x.amin(dim=0)
    centred = x - x.mean(dim=0, keepdim=True)
    centred[:, constant] = 0
    norms = centred.norm(dim=0)
    return centred / torch.where(constant, torch.ones_like(norms), norms)


def _gamma(n):
    """γ_n = n·u/(1 − n·u): the classic bound on the relative rounding error of a float32 sum or dot product of
    length n, whatever the summation order (Higham, Accuracy and Stability of Numerical Algorithms, §3.1)."""
    return n * _FLOAT32_ROUNDOFF / (1 - n * _FLOAT32_ROUNDOFF)


def _column_sums(x, term=None):
    """Per-column Σ over the rows of term(x) (default: x itself; e.g. x > 0 counts positives), in float64.

    float32 partial sums over _SUM_CHUNK rows, added up in float64: error ≤ γ_16·Σ|terms| + O(1e-16), at float32
    speed (a float64 reduction is ~6× slower on CPU); counts are exact. Terms are formed slab by slab, so no N×M
    temporary is allocated (on CPU, touching fresh memory costs more than the arithmetic: 5× here).
    """
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for part in x.split(max(_SUM_CHUNK, _SUM_SLAB // max(x.shape[1], 1) // _SUM_CHUNK * _SUM_CHUNK)):
        if term is not None:
            part = term(part)
        whole = part.shape[0] - part.shape[0] % _SUM_CHUNK
        counting = torch.int32 if part.dtype == torch.bool else None  # bools: int32 sums are 4× faster than int64
        total += part[:whole].reshape(-1, _SUM_CHUNK, x.shape[1]).sum(dim=1, dtype=counting).double().sum(dim=0)
        total += part[whole:].double().sum(dim=0)
    return total


class _Float32Standardized:
    """The columns of x centred and scaled to unit norm in float32, formed on demand, with a proven error bound.

    rows(k) and columns(index) return the standardised entries (no N×M array is ever formed); eps[i] bounds
    ‖z_i − ẑ_i‖₂, where z_i is column i as returned and ẑ_i the exactly standardised column (all zero if constant, as
    in _standardized_columns). Error budget (u = 2⁻²⁴, g = γ_16 + 3u, ρ_i = mean|x_i| / std_i): rounding x to
    float32, the chunked mean and its rounding shift every centred entry by ≤ g·mean|x_i|, which moves the unit
    vector by ≤ 2g·ρ_i; the subtraction, the chunked sum of squares and the scaling add ≤ g + 2u·ρ_i. Hence
    eps_i = g·(1 + 3ρ_i). Columns where that exceeds _MAX_COLUMN_ERROR (nearly constant ones, ρ_i ≳ 30) are
    standardised in float64 instead (eps_i = 2u).
    """

    def __init__(self, x):
        n_rows = x.shape[0]
        low = x.amin(dim=0)
        constant = x.amax(dim=0) == low  # exact zero variance, tested in the input's own dtype
        self.x, self.x32 = x, x.float()
        sums = _column_sums(self.x32)
        abs_sums = sums if low.min() >= 0 else _column_sums(self.x32, torch.abs)  # ReLU outputs: Σ|x| = Σx
        self.shift = (sums / n_rows).float()
        scale = _column_sums(self.x32, lambda part: (part - self.shift).square_()).sqrt()  # ‖x_i − mean_i‖₂
        self.inverse = torch.where(constant, 0.0, 1.0 / scale).float()
        g = _gamma(_SUM_CHUNK) + 3 * _FLOAT32_ROUNDOFF
        eps = g * (1 + 3 * abs_sums / (math.sqrt(n_rows) * scale))  # ρ_i = Σ|x_i| / (√N·scale)
        self.eps = torch.where(constant, 0.0, eps.nan_to_num(nan=math.inf))  # scale 0, not constant: float64 path
        self.fragile = self.eps > _MAX_COLUMN_ERROR
        self.eps[self.fragile] = 2 * _FLOAT32_ROUNDOFF

    def rows(self, step):
        """Every step-th example (row) of all the standardised columns."""
        z = (self.x32[::step] - self.shift).mul_(self.inverse)
        if self.fragile.any():
            z[:, self.fragile] = _standardized_columns(self.x[:, self.fragile])[::step].float()
        return z

    def columns(self, index):
        """The standardised columns `index` (a 1-D index tensor), all examples."""
        # index_select gathers ~5× faster than fancy indexing; in-place ops: fresh memory is costly on CPU
        z = self.x32.index_select(1, index).sub_(self.shift[index]).mul_(self.inverse[index])
        fragile = self.fragile[index]
        if fragile.any():
            z[:, fragile] = _standardized_columns(self.x[:, index[fragile]]).float()
        return z


def duplicate_columns(x, corr_threshold):
    """Boolean mask of the columns that the greedy de-duplication of SPEC §1.1 (step 5) deletes.

    Greedy rule, in column order: column i is deleted if |corr(i, j)| > τ for any column j still present. When i is
    visited every later column is still present, and every earlier column still present was kept, so it has no partner
    after it (in particular not i). Hence i is deleted exactly when |corr(i, j)| > τ for some j > i: threshold the
    strict upper triangle of the correlation matrix and reduce over rows. No loop over neurons.
    Speed, exactly: with unit (standardised) columns z, corr(i, j) = ⟨z_i, z_j⟩ splits over a head sample S of the
    examples (every k-th, 1/k ≈ 2(1 − τ): every 10th at τ = 0.95) and the rest R, so by Cauchy–Schwarz
    |corr(i, j)| ≤ |⟨z_i^S, z_j^S⟩| + ‖z_i^R‖·‖z_j^R‖ ≈ |corr(i, j)|/k + 1 − 1/k. The head products cost 1/k of the
    full correlation matrix, and only pairs whose bound reaches τ (|corr| ≳ 1/2: few per column) get their full
    correlation computed. Everything runs in float32 with proven rounding error bounds; pairs within that margin of τ
    are recomputed in float64, so the result is that of an exact float64 computation. (10752 × 4096 with a third
    duplicated columns: ~4× faster than the full float32 matrix on one CPU core; see benchmark.py.)
    """
    n_rows, n_cols = x.shape
    deleted = torch.zeros(n_cols, dtype=torch.bool, device=x.device)
    if n_cols < 2:
        return deleted
    z = _Float32Standardized(x)
    err = z.eps.max().item()
    # |float32 value − exact| ≤ γ_{N+2}(1 + err)² (products of rounded unit columns) + 2·err + err² (column errors)
    margin = max(_CORR_RECHECK_MARGIN, _gamma(n_rows + 2) * (1 + err) ** 2 + 2 * err + err ** 2)
    head = z.rows(max(1, round(0.5 / (1 - corr_threshold))) if corr_threshold < 1 else 1)
    # ‖z_i^R‖² = ‖z_i‖² − ‖z_i^S‖² with ‖z_i‖ ≤ 1 + eps_i (squares summed in float64)
    rest = ((1 + z.eps) ** 2 - head.double().square().sum(dim=0)).clamp_(min=0).sqrt_().float()
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the bounds assume true float32 products (no TF32 on a GPU)
    try:
        pairs = []
        for start in range(0, n_cols, _CORR_BLOCK):
            clear, ambiguous = _duplicates_in_block(z, head, rest, start, corr_threshold - margin,
                                                    corr_threshold + margin)
            deleted[start:start + _CORR_BLOCK] |= clear
            pairs.append(ambiguous)
    finally:
        torch.set_float32_matmul_precision(precision)
    pairs = torch.cat(pairs)
    pairs = pairs[~deleted[pairs[:, 0]]]  # rows already deleted by a clear partner need no recheck
    for chunk in pairs.split(1024):  # bounded memory: N × 1024 float64 per side
        exact = (_standardized_columns(x[:, chunk[:, 0]]) * _standardized_columns(x[:, chunk[:, 1]])).sum(dim=0)
        deleted[chunk[exact.abs() > corr_threshold, 0]] = True
    return deleted


def _duplicates_in_block(z, head, rest, start, lower, upper):
    """Columns i of the block [start, start + _CORR_BLOCK) against all j > i: which i have a partner with float32
    |corr| > upper, and the (i, j) pairs with lower < |corr| ≤ upper, to be decided in float64."""
    stop = min(start + _CORR_BLOCK, head.shape[1])
    # upper bound on |corr(i, j)| for j ≥ start; pairs j ≤ i only occur in the block's own (diagonal) square
    bound = (head[:, start:stop].T @ head[:, start:]).abs_().addcmul_(rest[start:stop, None], rest[None, start:])
    bound[:, :stop - start].triu_(diagonal=1)
    candidate = bound > lower
    clear = torch.zeros(stop - start, dtype=torch.bool, device=head.device)
    own = candidate.any(dim=1).nonzero().squeeze(1)  # block columns (from start) in some candidate pair...
    partners = candidate[own].any(dim=0).nonzero().squeeze(1)  # ...and their partners: full correlations only there
    both = z.columns(start + torch.cat([own, partners]))  # one gather for the two sides
    corr = (both[:, :own.numel()].T @ both[:, own.numel():]).abs_()
    candidate = candidate[own][:, partners]
    clear[own] = (candidate & (corr > upper)).any(dim=1)
    rows, cols = torch.nonzero(candidate & (corr > lower) & (corr <= upper), as_tuple=True)
    return clear, torch.stack([own[rows] + start, partners[cols] + start], dim=1)


def feature_sparsity(phi, corr_threshold=0.95, max_neurons=None, seed=0):
    """Feature sparsity coefficient of SPEC §1.1: returns (density, dedup_density), both in [0, 1]; lower = sparser.

    phi: N×M post-ReLU activations (numpy array or tensor; N examples, M neurons; extra trailing dimensions, e.g.
    the channel×height×width of a conv layer, are flattened so that every position is one neuron).
      1. density = fraction of positive entries of phi (on all M columns).
      2. if max_neurons is set and M > max_neurons, keep a random subset of max_neurons columns (seeded, without
         replacement, in their original order); M' = the number of columns from here on.
      3. drop columns that are never positive ("dead" neurons).
      4.-5. greedy de-duplication: drop column i if its Pearson correlation with a later column has |C| > τ.
      6. dedup_density = positive entries of the kept columns / (N·M'); dead and deleted columns stay in M'.
    Paper settings: τ = 0.95 with max_neurons = 1000 for deep nets, τ = 0.99 / 0.999 for the ReLU toys (SPEC §1.1).
    Runs on the tensor's device (pass a CUDA tensor to compute on the GPU).
    """
    phi = _as_activation_matrix(phi)
    if phi.numel() == 0:
        raise ValueError(f"feature_sparsity needs at least one example and one neuron, got shape {tuple(phi.shape)}")
    counts = _column_sums(phi, lambda part: part > 0)  # positive entries per column (exact integers in float64)
    density = counts.sum().item() / phi.numel()
    subset = neuron_subset(phi.shape[1], max_neurons, seed)
    if subset is not None:
        subset = subset.to(phi.device)
        phi, counts = phi.index_select(1, subset), counts[subset]
    return density, _dedup_density(phi, counts, corr_threshold)


def neuron_subset(n_cols, max_neurons, seed=0):
    """Sorted indices of the max_neurons columns kept by SPEC §1.1 step 2, or None when no subsampling is needed.

    The subset depends only on (n_cols, max_neurons, seed), so every evaluation of a run measures the same neurons.
    """
    if max_neurons is None or n_cols <= max_neurons:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_cols, generator=generator)[:max_neurons].sort().values


def dedup_density(phi, corr_threshold):
    """De-duplicated density of an (already subsampled) N×M' activation matrix: SPEC §1.1 steps 3-6."""
    return _dedup_density(phi, _column_sums(phi, lambda part: part > 0), corr_threshold)


def _dedup_density(phi, counts, corr_threshold):
    """dedup_density, given the number of positive entries of each column."""
    alive = counts > 0
    if not alive.all():  # no copy when no neuron is dead
        phi = phi.index_select(1, alive.nonzero().squeeze(1))
    deleted = duplicate_columns(phi, corr_threshold)
    return counts[alive][~deleted].sum().item() / (phi.shape[0] * counts.numel())


def _neuron_columns(output, subset):
    """A copy of the columns `subset` (all if None) of output flattened per example in NCHW order, i.e. one column
    per channel×position (SPEC §1.1). A channels_last map is read in its own layout: flattening it in NCHW order
    would first copy the whole map."""
    n = output.shape[0]
    if subset is None:  # at most max_neurons columns: an extra copy costs nothing worth special-casing
        return output.reshape(n, -1).clone()
    if output.dim() == 4 and not output.is_contiguous() and output.is_contiguous(memory_format=torch.channels_last):
        channels, positions = output.shape[1], output.shape[2] * output.shape[3]
        nhwc = output.permute(0, 2, 3, 1).reshape(n, -1)  # a view: NCHW column c·HW + p is NHWC column p·C + c
        return nhwc[:, (subset % positions) * channels + subset // positions]
    return output.reshape(n, -1)[:, subset]


class BlockActivations:
    """Forward hooks that gather, for the feature sparsity metric, the outputs of named modules of ANY torch model.

    blocks: {name used in results: module path for model.get_submodule, or the module itself}. While the context is
    open, every forward pass adds its batch: each block's positive-entry count (for the raw density over all neurons)
    and its output restricted to the neuron subset of SPEC §1.1 step 2 (so a 64×32×32 conv map never has to be held
    for 10 752 images). One forward pass serves all blocks (the authors' code ran one pass per block).

        with utils.BlockActivations(model, {"layer4": "layer4", "pooled": "avgpool"}) as acts, torch.no_grad():
            for x in batches:
                model(x)
        print(acts.feature_sparsity(corr_threshold=0.95))   # {"layer4": (density, dedup_density), ...}
    """

    def __init__(self, model, blocks, max_neurons=1000, seed=0):
        self.max_neurons, self.seed = max_neurons, seed
        self.modules = {name: model.get_submodule(m) if isinstance(m, str) else m for name, m in blocks.items()}
        self.handles, self.positives, self.counts, self.kept, self.subsets = [], {}, {}, {}, {}

    def __enter__(self):
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc_info):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return False

    def _hook(self, name):
        def hook(module, inputs, output):
            output = output.detach()
            if name not in self.subsets:
                subset = neuron_subset(output[0].numel(), self.max_neurons, self.seed)
                self.subsets[name] = None if subset is None else subset.to(output.device)
                self.positives[name], self.counts[name], self.kept[name] = 0, 0, []
            # count_nonzero of the mask: ~15× faster on CPU than (output > 0).sum(), which widens the bools to int64.
            # Stays on the device: no host sync per batch.
            self.positives[name] = self.positives[name] + torch.count_nonzero(output > 0)
            self.counts[name] += output.numel()
            # a copy either way: a later in-place op of the model (e.g. ReLU(inplace=True)) must not alter it
            self.kept[name].append(_neuron_columns(output, self.subsets[name]))

        return hook

    def feature_sparsity(self, corr_threshold=0.95):
        """{block name: (density, dedup_density)} over all batches seen so far (SPEC §1.1)."""
        return {name: (int(self.positives[name]) / self.counts[name],
                       dedup_density(torch.cat(self.kept[name]), corr_threshold))
                for name in self.modules if name in self.kept}


@torch.no_grad()
def block_feature_sparsity(model, blocks, batches, corr_threshold=0.95, max_neurons=1000, seed=0):
    """Feature sparsity of several blocks of a model from one forward pass per batch, in eval mode (SPEC §1.1).

    batches: an iterable of model inputs (e.g. `(x.to(device) for x, _ in loader)`). Returns
    {block name: (density, dedup_density)}. The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        with BlockActivations(model, blocks, max_neurons, seed) as acts:
            for batch in batches:
                model(batch)
    finally:
        model.train(was_training)
    return acts.feature_sparsity(corr_threshold)


def jacobian_rank(jacobian, eps):
    """Numerical rank of a Jacobian (SPEC §1.2): #{k : σ_k / σ_1 > eps}, singular values in float64.

    jacobian: P×D matrix whose row i is ∇_θ h_θ(x_i) (numpy array or tensor). An all-zero matrix has rank 0.
    """
    jac = torch.as_tensor(jacobian).double()
    if jac.numel() == 0:
        return 0
    singular_values = torch.linalg.svdvals(jac)
    if singular_values[0] <= 0:
        return 0
    return int((singular_values / singular_values[0] > eps).sum().item())


def model_jacobian(model, x):
    """Rows ∇_θ h_θ(x_i) for a scalar-output torch model, one per input row, as a P×(#params) tensor.

    Uses torch.func (per-example gradients by vmap), so no Python loop over points.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}

    def scalar_output(p, xi):
        return torch.func.functional_call(model, p, (xi.unsqueeze(0),)).reshape(())

    grads = torch.func.vmap(torch.func.grad(scalar_output), in_dims=(None, 0))(params, x)
    return torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], dim=1)


# ======================================================================================================================
# Step-size schedules (SPEC §2)
# ======================================================================================================================


def toy_step_sizes(n_iters, lr, decay_frac=None, decay=1.0, warmup_factor=1.0, warmup_power=1.0):
    """Per-iteration step sizes of the toy experiments (SPEC §2), as a float64 array of length n_iters.

    Iteration i (0-based) uses η_i = lr·(1 + (F − 1)·(i/N)^p) while i ≤ k = ⌊T·N⌋ (N = n_iters, F = warmup_factor,
    p = warmup_power; F = 1 means no warmup, i.e. η_i = lr), and η_k / d for every i > k: the single decay by
    d = `decay` is applied after iteration k's update. decay_frac=None means a constant step size lr.
    Note i/N divides by the TOTAL iteration count, not the warmup length, as in the authors' code.
    """
    if decay_frac is None:
        return np.full(n_iters, float(lr))
    last_large = math.floor(decay_frac * n_iters)
    steps = np.arange(n_iters, dtype=np.float64)
    warm = lr * (1.0 + (warmup_factor - 1.0) * (steps / n_iters) ** warmup_power)
    peak = lr * (1.0 + (warmup_factor - 1.0) * (last_large / n_iters) ** warmup_power)
    return np.where(steps <= last_large, warm, peak / decay)


def deep_step_size(epoch, epochs, lr, schedule="piecewise", warmup_exp=1.0, large_frac=0.5):
    """Step size of the deep-net experiments at fractional epoch `epoch` (SPEC §2 table).

    constant: lr. piecewise: a large-step phase for epoch < T·E (T = large_frac, E = epochs), then ÷10 until 0.9·E,
    then ÷100. During the large-step phase, with u = 100·epoch/E (one unit per 1 % of training):
      w > 1: exponential warmup lr·w^u;  w < 1: power warmup lr·(1 + u^w);  w = 1: no warmup, lr.
    Both later phases start from the value the warmup reached at T·E (peak multiplier w^(100T), e.g. 11.467 for
    w = 1.05, T = 0.5). Called before every SGD step with that step's fractional epoch.
    """
    if schedule == "constant":
        return lr
    if schedule != "piecewise":
        raise ValueError(f"unknown schedule {schedule!r}")

    def warmed(u):
        if warmup_exp > 1:
            return lr * warmup_exp ** u
        if warmup_exp < 1:
            return lr * (1.0 + u ** warmup_exp)
        return lr

    if epoch < large_frac * epochs:
        return warmed(100.0 * epoch / epochs)
    peak = warmed(100.0 * large_frac)
    return peak / 10 if epoch < 0.9 * epochs else peak / 100


# ======================================================================================================================
# Toy-model helpers, shared by diag_net.py and two_layer_relu.py (SPEC E1–E6)
# ======================================================================================================================


def flag_name(dest):
    """The command-line flag of an argparse destination, 'decay_frac' -> '--decay-frac' (to name it in errors)."""
    return "--" + dest.replace("_", "-")


def eval_iterations(n_iters, n_points, dense_prefix=0):
    """Evaluation iterations of the toy experiments, sorted and unique: {0..dense_prefix−1} ∪ round(linspace(0, N,
    K))[:-1] with N = n_iters, K = n_points (SPEC E1: the diagonal nets add every iteration below 100).

    Metrics are taken BEFORE the update of each of these iterations, so the last one is the "final" point of SPEC E1.
    np.round rounds halves to even (2.5 -> 2), like the authors' numpy. A point that rounds to N (only when K > N)
    is dropped: there is no iteration N to evaluate before.
    """
    spread = np.round(np.linspace(0, n_iters, n_points)).astype(int)[:-1]
    dense = np.arange(min(dense_prefix, n_iters))
    evals = np.unique(np.concatenate([dense, spread]))
    return evals[evals < n_iters]


def seed_summary(seeds, statuses, finals):
    """One run over its seeds (SPEC E1: the large-step runs sit at the edge of divergence, so compare over seeds):
    which seeds diverged, and the median of every metric of the final records of the others.

    seeds, statuses, finals: one entry per seed (a deterministic run has seeds [None]); finals are the logs' `final`
    records (the last evaluation, before its update). Only 'completed' seeds enter the medians; `iter` and `lr` are
    not metrics, and a metric some completed seed lacks (or logged as null) is taken over the seeds that have it.
    Both toy scripts store the result as the `seed_summary` key of every log of the run.
    """
    done = [final for status, final in zip(statuses, finals) if status == "completed"]
    diverged = [seed for seed, status in zip(seeds, statuses) if status == "diverged"]
    medians = None
    if done:
        keys = [key for key in done[0] if key not in ("iter", "lr")]
        values = {key: [final[key] for final in done if final.get(key) is not None] for key in keys}
        medians = {key: float(np.median(found)) for key, found in values.items() if found}
    return {"seeds": list(seeds), "diverged_seeds": diverged, "fraction_diverged": len(diverged) / len(seeds),
            "median_final": medians, "final_iter": done[0]["iter"] if done else None}


# ======================================================================================================================
# Deep-net training (SPEC E7–E10), shared by train_resnet.py and train_densenet.py
# ======================================================================================================================

SPARSITY_TAU_DEEP = 0.95  # SPEC §1.1: de-duplication threshold for deep nets
_DIVERGENCE_CHECK_EVERY = 25  # steps between finite-loss checks (one host sync each, never one per step)


def add_deep_net_arguments(parser, script, lr, warmup_exp):
    """The command-line flags both deep-net scripts share (same name, same meaning); defaults = the paper's E7."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="cifar10", choices=IMAGE_DATASETS,
                      help="image classification data set; 'synthetic' is a small generated set for offline tests")
    data.add_argument("--data-dir", default="./data",
                      help="folder holding cifar-10-batches-py/, cifar-100-python/ or tiny-imagenet-200/")
    data.add_argument("--download", action=argparse.BooleanOptionalAction, default=False,
                      help="download the data set into --data-dir if it is missing")
    data.add_argument("--n-train", type=positive_int, default=None,
                      help="use only the first N training images (default: all)")
    optim = parser.add_argument_group("optimisation (SPEC §2)")
    optim.add_argument("--epochs", type=positive_int, default=100, help="training epochs E")
    optim.add_argument("--batch-size", type=positive_int, default=256, help="SGD mini-batch size")
    optim.add_argument("--lr", type=positive_float, default=lr,
                       help="η0: the initial step size, BEFORE warmup (the peak is η0·w^(100T) for w > 1)")
    optim.add_argument("--lr-schedule", default="piecewise", choices=["constant", "piecewise"],
                       help="constant η0, or a large-step phase for T·E epochs then ÷10, and ÷100 from 0.9·E")
    optim.add_argument("--warmup-exp", type=positive_float, default=warmup_exp,
                       help="w: exponential warmup η0·w^u if w > 1 (u = %% of training done), power warmup "
                            "η0·(1 + u^w) if w < 1, no warmup if w = 1 (piecewise schedule only)")
    optim.add_argument("--large-lr-frac", type=positive_float, default=0.5,
                       help="T: fraction of training spent in the large-step phase, in (0, 0.9) (paper: 0.1, 0.3, 0.5)")
    optim.add_argument("--momentum", type=nonnegative_float, default=0.0, help="SGD (heavy-ball) momentum, in [0, 1)")
    optim.add_argument("--weight-decay", type=nonnegative_float, default=0.0,
                       help="L2 penalty coefficient on all parameters (SPEC §4)")
    optim.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                       help="random crop (4-pixel zero padding) and horizontal flip, done per batch on the device")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval-every", type=positive_int, default=200,
                            help="iterations between evaluations (and checkpoints)")
    evaluation.add_argument("--sparsity-examples", type=positive_int, default=10752,
                            help="fixed unaugmented training images used for the feature sparsity and the train "
                                 "loss/error (capped at the training-set size)")
    evaluation.add_argument("--sparsity-neurons", type=positive_int, default=1000,
                            help="neurons sampled per block for the de-duplicated sparsity (SPEC §1.1)")
    evaluation.add_argument("--eval-batch-size", type=positive_int, default=None,
                            help="images per forward pass during evaluation (default: 128 on CPU, where small "
                                 "batches stay in cache and run ~2× faster than 512; 512 on GPU); lower it if "
                                 "memory is short")
    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=nonnegative_int, default=0, help="seeds the initialisation, batches and augmentation")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                     help="auto = CUDA if available, else MPS, else CPU")
    run.add_argument("--out-dir", default=os.path.join("runs", script),
                     help="folder for the JSON log and the checkpoint of this run")
    run.add_argument("--resume", action="store_true",
                     help="continue this run (same flags) from its last checkpoint in --out-dir")
    run.add_argument("--stop-at-epoch", type=positive_int, default=None,
                     help="checkpoint and stop after this many epochs (e.g. to fit a job time limit); "
                          "continue later with --resume")
    run.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                     help="CUDA matmul/conv precision: exact fp32, TF32 tensor cores, or bf16 autocast "
                          "(CPU always runs fp32)")
    run.add_argument("--compile", action="store_true", help="torch.compile the training forward/backward")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                     help="NHWC memory format for images and conv weights (faster convolutions on CPU and GPU)")
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic CUDA kernels (cuDNN benchmark off); slower, bit-reproducible on one GPU")


def check_deep_net_args(args):
    """Cross-flag checks argparse cannot express, as one-line usage errors."""
    if args.lr_schedule == "piecewise" and not args.large_lr_frac < 0.9:
        usage_error("--large-lr-frac", f"must be below 0.9 (the ÷100 phase starts at 0.9·E), got {args.large_lr_frac}")
    if args.momentum >= 1:
        usage_error("--momentum", f"must be in [0, 1), got {args.momentum}")
    if args.stop_at_epoch is not None and args.stop_at_epoch >= args.epochs:
        usage_error("--stop-at-epoch", f"must be below --epochs ({args.epochs}), got {args.stop_at_epoch}")


def default_eval_batch_size(device):
    """Images per evaluation forward pass: 128 on CPU, where small batches stay in cache (measured on a 2-core CPU,
    ResNet-18 width 16: 10 240 images in 1.9 s at 128, 3.8 s at 512), 512 on accelerators."""
    return 128 if device.type == "cpu" else 512


def _configure_backend(args, device):
    """Apply --precision / --deterministic and resolve the device-dependent default of --eval-batch-size; returns the
    precision actually used (CPU always runs fp32)."""
    if args.eval_batch_size is None:
        args.eval_batch_size = default_eval_batch_size(device)
    precision = args.precision if device.type == "cuda" else "fp32"
    if precision != args.precision:
        print(f"note: --precision {args.precision} applies to CUDA only; running fp32 on {device.type}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        torch.backends.cudnn.allow_tf32 = precision != "fp32"  # PyTorch enables TF32 convs by default
        torch.backends.cudnn.benchmark = not args.deterministic
        torch.backends.cudnn.deterministic = args.deterministic
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    return precision


def _has_broken_onednn_conv(model):
    """True if the model has a 1×1 strided convolution with 2-7 input channels: torch 2.14's oneDNN CPU backward of
    such a conv in channels_last segfaults, hangs or returns wrong weight gradients on AVX2 CPUs (its AVX2 1×1 kernel;
    reproduced on an AVX-512 machine with ONEDNN_MAX_CPU_ISA=AVX2: relative weight-gradient errors up to 1.0 against
    the NCHW gradient, then a crash or a hang; 1 and 8+ input channels, and AVX-512 kernels, are exact). It appears at
    tiny widths (ResNet-18 shortcuts at --width 2-7); DenseNet's 1×1 convolutions have stride 1. The fallback applies
    on every CPU on purpose: oneDNN picks its kernels at run time (and ONEDNN_MAX_CPU_ISA can lower them), so the
    instruction set torch reports does not tell which kernel will run; at these tiny widths NCHW costs little."""
    return any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
               and 2 <= m.in_channels <= 7 for m in model.modules())


def apply_channels_last(args, model, device):
    """Move the model to channels_last if --channels-last (measurably faster convolutions on CPU and GPU), except on
    the CPU for models that hit the oneDNN bug above: then args.channels_last is set to False (so the logged config
    and the input batches follow) with a note. Returns the model."""
    if args.channels_last and device.type == "cpu" and _has_broken_onednn_conv(model):
        print("note: running without channels_last: torch's CPU backward of a channels_last 1×1 strided conv with "
              "2-7 input channels is broken (crashes or wrong gradients); use --width 8 or more for channels_last")
        args.channels_last = False
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def schedule_label(args):
    """Human label of a run's step-size schedule, used as the run name in logs and plot legends."""
    if args.lr_schedule == "constant":
        label = f"η = {args.lr:g} constant"
    elif args.warmup_exp == 1:
        label = f"η0 = {args.lr:g}, decay at {100 * args.large_lr_frac:g} %"
    else:
        kind = "exp." if args.warmup_exp > 1 else "power"
        label = f"η0 = {args.lr:g}, {kind} warmup w = {args.warmup_exp:g}, decay at {100 * args.large_lr_frac:g} %"
    if args.momentum or args.weight_decay or args.augment:
        label += f" (mom {args.momentum:g}, wd {args.weight_decay:g}{', aug' if args.augment else ''})"
    return label


class DeepNetRun:
    """One training run of a deep net: data on the device, SGD with the SPEC §2 schedule, evaluation, log, checkpoint.

    Batches are index slices of a per-epoch permutation and augmentation draws its random numbers from (seed, step)
    (see epoch_permutation / augment_batch), so a run is a pure function of its flags and the step counter: resuming
    from a checkpoint replays exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, args, model, data, script, experiment, blocks, run_parts, device, precision):
        self.args, self.model, self.data, self.blocks, self.device = args, model, data, blocks, device
        self.autocast = precision == "bf16"
        n_train = data.train_images.shape[0]
        self.steps_per_epoch = math.ceil(n_train / args.batch_size)  # last batch may be smaller: no image dropped
        self.total_steps = args.epochs * self.steps_per_epoch
        self.n_sparsity = min(args.sparsity_examples, n_train)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                         weight_decay=args.weight_decay)
        self.train_forward = torch.compile(model) if args.compile else model  # evaluation runs eager (hooks)
        name = f"{experiment}_{run_slug(**run_parts)}_seed{args.seed}"
        self.log_path = os.path.join(args.out_dir, name + ".json")
        self.checkpoint_path = os.path.join(args.out_dir, name + ".pt")
        self.step, self.cached_epoch, self.permutation = 0, None, None
        # sum of the mini-batch losses since the last evaluation, kept on the device (no host sync per step)
        self.window_loss, self.window_steps = torch.zeros((), device=device), 0
        self.elapsed_before, self.clock = 0.0, None  # wall time of the earlier parts of a resumed run
        self.stop_requested = 0  # number of the signal (Ctrl-C, SIGTERM) that asked the run to stop; 0 = none
        config = {k: v for k, v in vars(args).items() if k != "resume"}
        config.update(n_train=n_train, n_test=data.test_images.shape[0], num_classes=data.num_classes,
                      steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                      sparsity_examples_used=self.n_sparsity, precision_used=precision, blocks=list(blocks))
        env = environment_info(device)
        env.update(n_params=sum(p.numel() for p in model.parameters()), deterministic=args.deterministic,
                   compile=args.compile, channels_last=args.channels_last, precision=precision)
        history = self._resume() if args.resume else []
        self.log = RunLog(self.log_path, script, config, env, history=history, experiment=experiment,
                          run=schedule_label(args), seed=args.seed)

    # ---------------------------------------------------------------------------------------------- checkpoints ----

    def _resume(self):
        """Load the checkpoint of this exact run (same flags); returns the log history up to the checkpointed step."""
        if not os.path.exists(self.checkpoint_path):
            usage_error("--resume", f"no checkpoint at {self.checkpoint_path}; start the run without --resume "
                                    "(resume needs the same flags and --out-dir as the original run)")
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        # flags that may differ between the parts of a run: evaluation never changes the training trajectory, and the
        # memory format only its rounding (channels_last is also switched off by apply_channels_last on some models)
        ignored = {"resume", "stop_at_epoch", "device", "eval_batch_size", "channels_last"}
        changed = [k for k, v in state["args"].items() if k not in ignored and vars(self.args).get(k) != v]
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            usage_error("--resume", f"the checkpoint was made with different {flags}; use the original flags")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.window_loss = torch.tensor(state["window_loss"], device=self.device)
        self.window_steps, self.elapsed_before = state["window_steps"], state["elapsed"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        with open(self.log_path) as f:
            history = json.load(f)["history"]
        print(f"resuming {self.log_path} at iteration {self.step} (epoch {self.step / self.steps_per_epoch:.2f})")
        return [record for record in history if record["iter"] <= self.step]

    def save_checkpoint(self):
        """Model, optimizer, step and RNG states, written to a temp file then renamed (never a broken checkpoint)."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                 "window_loss": self.window_loss.item(), "window_steps": self.window_steps,
                 "elapsed": self.clock.elapsed(), "args": vars(self.args), "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                 "numpy_rng": np.random.get_state()}
        tmp = self.checkpoint_path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    # ---------------------------------------------------------------------------------------------- training -------

    def batch(self, step):
        """Images (float, on device) and labels of SGD step `step`: a slice of this epoch's seeded permutation."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self.cached_epoch:
            n_train = self.data.train_images.shape[0]
            self.permutation = epoch_permutation(n_train, epoch, self.args.seed, self.device)
            self.cached_epoch = epoch
        indices = self.permutation[index * self.args.batch_size:(index + 1) * self.args.batch_size]
        images = self.data.train_images[indices]
        if self.args.augment:
            images = augment_batch(images, self.args.seed, step)
        return images_to_float(images, self.args.channels_last), self.data.train_labels[indices]

    def train_step(self, step):
        """One SGD step; the step size is set from this step's fractional epoch (SPEC §2).

        Returns the loss as a device tensor (no host sync) and the number of images in the batch."""
        lr = deep_step_size(step / self.steps_per_epoch, self.args.epochs, self.args.lr, self.args.lr_schedule,
                            self.args.warmup_exp, self.args.large_lr_frac)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images, labels = self.batch(step)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = torch.nn.functional.cross_entropy(self.train_forward(images).float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), labels.shape[0]

    # ---------------------------------------------------------------------------------------------- evaluation -----

    @torch.no_grad()
    def _loss_and_error(self, images, labels):
        """Mean cross-entropy and error rate over a whole image set, in eval-size chunks (one host sync at the end)."""
        loss_sum = torch.zeros((), device=self.device)
        errors = torch.zeros((), device=self.device, dtype=torch.long)
        for start in range(0, images.shape[0], self.args.eval_batch_size):
            chunk = images_to_float(images[start:start + self.args.eval_batch_size], self.args.channels_last)
            target = labels[start:start + self.args.eval_batch_size]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(chunk).float()
            loss_sum += torch.nn.functional.cross_entropy(logits, target, reduction="sum")
            errors += (logits.argmax(dim=1) != target).sum()
        return loss_sum.item() / images.shape[0], errors.item() / images.shape[0]

    def evaluate(self):
        """Train loss/error and feature sparsity of every block from ONE eval-mode pass over the fixed unaugmented
        sparsity images (SPEC §1.1, E7), then test loss/error on the whole test set."""
        self.model.eval()
        with BlockActivations(self.model, self.blocks, self.args.sparsity_neurons, self.args.seed) as acts:
            train_loss, train_error = self._loss_and_error(self.data.train_images[:self.n_sparsity],
                                                           self.data.train_labels[:self.n_sparsity])
        sparsity = acts.feature_sparsity(SPARSITY_TAU_DEEP)
        test_loss, test_error = self._loss_and_error(self.data.test_images, self.data.test_labels)
        self.model.train()
        metrics = {"train_loss": train_loss, "train_error": train_error, "test_loss": test_loss,
                   "test_error": test_error}
        for name, (density, dedup) in sparsity.items():
            metrics[f"density_{name}"], metrics[f"density_dedup_{name}"] = density, dedup
        return metrics

    # ---------------------------------------------------------------------------------------------- main loop ------

    def _request_stop(self, signum, frame):
        """First Ctrl-C (or SIGTERM, which job schedulers send before killing a job): finish the current step,
        checkpoint, mark the log interrupted. A second one stops at once."""
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step (send it again to abort at once)", flush=True)

    def run(self):
        """Train to the end (or to --stop-at-epoch / Ctrl-C / SIGTERM / divergence); returns the final status."""
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with self.log:
                status = self._loop()
                self.log.finish(status)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return status

    def _loop(self):
        args, start_step = self.args, self.step
        stop_step = self.total_steps if args.stop_at_epoch is None else args.stop_at_epoch * self.steps_per_epoch
        print(f"{self.log.data['run']} | {self.data.name}: {self.data.train_images.shape[0]} train / "
              f"{self.data.test_images.shape[0]} test images | {self.log.data['env']['n_params']:,} parameters | "
              f"{self.total_steps} iterations ({self.steps_per_epoch}/epoch) on {self.device}\nlog: {self.log_path}")
        clock = self.clock = _RunClock(self.elapsed_before)
        if not self.log.data["history"]:
            self._evaluate_and_log()
        projection_step = start_step + min(10, stop_step - start_step)  # early, once the first steps are timed
        while self.step < stop_step:
            loss, n_images = self.train_step(self.step)
            self.window_loss += loss
            self.window_steps += 1
            self.step += 1
            clock.add_images(n_images)
            if self.step % _DIVERGENCE_CHECK_EVERY == 0 and not torch.isfinite(self.window_loss).item():
                return self._diverged(self.window_loss / self.window_steps)
            if self.step == projection_step:
                clock.project(self.step, stop_step, args.eval_every)
            if self.step % args.eval_every == 0 or self.step == self.total_steps:
                if not torch.isfinite(self.window_loss).item():
                    return self._diverged(self.window_loss / self.window_steps)
                train_loss = self._evaluate_and_log()
                if not math.isfinite(train_loss):
                    return self._diverged(train_loss)
            if self.stop_requested:
                self.save_checkpoint()
                print(f"interrupted at iteration {self.step}; checkpoint saved, continue with --resume")
                return "interrupted"
        if self.step < self.total_steps:
            self.save_checkpoint()
            print(f"stopped at epoch {args.stop_at_epoch} as asked (--stop-at-epoch); continue with --resume")
            return "interrupted"
        return "completed"

    def _evaluate_and_log(self):
        """Evaluate, append a log record, checkpoint, print one progress line; returns the (eval-mode) train loss."""
        clock = self.clock
        clock.pause()
        metrics = self.evaluate()
        epoch = self.step / self.steps_per_epoch
        lr = deep_step_size(epoch, self.args.epochs, self.args.lr, self.args.lr_schedule, self.args.warmup_exp,
                            self.args.large_lr_frac)
        if self.window_steps:  # mean mini-batch loss (train mode, augmented) since the last evaluation
            metrics["train_loss_batches"] = self.window_loss.item() / self.window_steps
        self.window_loss, self.window_steps = torch.zeros((), device=self.device), 0
        self.log.record(iter=self.step, epoch=epoch, lr=lr, **metrics, wall_time=clock.elapsed(),
                        images_per_sec=clock.throughput())
        if self.step > 0:
            self.save_checkpoint()
        clock.resume()
        last_block = list(self.blocks)[-1]
        print(f"iter {self.step:>6}/{self.total_steps} ep {epoch:6.2f} | lr {lr:.4g} | train loss "
              f"{metrics['train_loss']:.4f} err {100 * metrics['train_error']:5.2f}% | test err "
              f"{100 * metrics['test_error']:5.2f}% | {last_block} density {100 * metrics[f'density_{last_block}']:.1f}% "
              f"dedup {100 * metrics[f'density_dedup_{last_block}']:.1f}% | {clock.throughput() or 0:.0f} img/s | "
              f"{format_seconds(clock.elapsed())} elapsed{clock.eta(self.step, self.total_steps, self.args.eval_every)}",
              flush=True)
        return metrics["train_loss"]

    def _diverged(self, loss):
        """Record a NaN/inf loss as status `diverged` with a clear message (the paper's large steps can diverge)."""
        loss = float(loss)
        epoch = self.step / self.steps_per_epoch
        lr = self.optimizer.param_groups[0]["lr"]
        self.log.record(iter=self.step, epoch=epoch, lr=lr, train_loss_batches=loss, train_loss=None)
        print(f"DIVERGED at iteration {self.step} (epoch {epoch:.2f}): training loss is {loss}; the step size "
              f"({lr:.4g} at that point) is too large for this setting. Log: {self.log_path}")
        return "diverged"


class _RunClock:
    """Wall-time bookkeeping of a run: training time and images (for throughput), evaluation time (for the ETA)."""

    def __init__(self, elapsed_before=0.0):
        """elapsed_before: wall time of the earlier parts of a resumed run (throughput counts this part only)."""
        now = time.perf_counter()
        self.start = now - elapsed_before
        self.train_seconds, self.eval_seconds, self.images, self.evals = 0.0, 0.0, 0, 0
        self.window_start, self.eval_start = now, None

    def pause(self):
        now = time.perf_counter()
        self.train_seconds += now - self.window_start
        self.eval_start = now

    def resume(self):
        now = time.perf_counter()
        self.eval_seconds += now - self.eval_start
        self.evals += 1
        self.window_start, self.eval_start = now, None

    def add_images(self, n_images):
        self.images += n_images

    def elapsed(self):
        return time.perf_counter() - self.start

    def throughput(self):
        """Training images per second so far (evaluation time excluded, also while an evaluation is running), or None
        before any training."""
        running = time.perf_counter() - self.window_start if self.eval_start is None else 0.0
        seconds = self.train_seconds + running
        return self.images / seconds if self.images and seconds > 0 else None

    def remaining_seconds(self, step, total_steps, eval_every, batch_images):
        per_step = batch_images / self.throughput() if self.throughput() else 0.0
        per_eval = self.eval_seconds / self.evals if self.evals else 0.0
        remaining_evals = total_steps // eval_every - step // eval_every
        return (total_steps - step) * per_step + remaining_evals * per_eval

    def eta(self, step, total_steps, eval_every):
        if step >= total_steps or not self.images:
            return ""
        batch_images = self.images / max(step, 1)
        return f", ETA {format_seconds(self.remaining_seconds(step, total_steps, eval_every, batch_images))}"

    def project(self, step, stop_step, eval_every):
        batch_images = self.images / step
        total = self.elapsed() + self.remaining_seconds(step, stop_step, eval_every, batch_images)
        print(f"projected wall time for this run: {format_seconds(total)} "
              f"({self.throughput():.0f} training images/s, evaluation every {eval_every} iterations)", flush=True)


def run_deep_net(args, build_model, script, model_name, run_parts):
    """Everything a deep-net script does after parsing its flags: data, model, training, log. Returns the status.

    build_model(num_classes) -> nn.Module with a SPARSITY_BLOCKS dict {log name: module path}.
    run_parts: model-specific parts of the run's file name (e.g. {"width": 64} for the ResNet).
    """
    check_deep_net_args(args)
    device = resolve_device(args.device)
    precision = _configure_backend(args, device)
    prepare_out_dir(args.out_dir)
    seed_everything(args.seed)
    data = load_image_dataset(args.dataset, args.data_dir, args.download, args.n_train, device)
    model = apply_channels_last(args, build_model(data.num_classes).to(device), device)
    schedule = {"constant": {}, "piecewise": {"warm": args.warmup_exp, "T": args.large_lr_frac}}[args.lr_schedule]
    parts = {"lr": args.lr, args.lr_schedule: True, **schedule, "mom": args.momentum or None,
             "wd": args.weight_decay or None, "aug": args.augment, "ep": args.epochs, "bs": args.batch_size,
             "n": args.n_train, **run_parts}
    run = DeepNetRun(args, model, data, script, f"{model_name}_{args.dataset}", model.SPARSITY_BLOCKS, parts,
                     device, precision)
    if args.resume and run.log.data["history"] and run.step >= run.total_steps:
        print(f"this run is already complete: {run.log_path}")
        run.log.finish("completed")
        return "completed"
    status = run.run()
    if run.stop_requested:
        raise SystemExit(128 + run.stop_requested)  # shell convention (130 for Ctrl-C), so a sweep loop stops too
    return status


# ======================================================================================================================
# Deep-net data (SPEC §5)
# ======================================================================================================================
#
# The deep-net scripts keep a whole data set as uint8 tensors on the training device (STYLE practice 5, as in
# airbench): a batch is an index slice of a seeded permutation, augmentation is a few tensor ops on the whole batch,
# and there is no DataLoader and no per-image Python code in the training loop. All randomness is a pure function of
# (seed, epoch) or (seed, step), so a resumed run replays exactly the same batches without saving generator state.

IMAGE_DATASETS = ("cifar10", "cifar100", "tinyimagenet", "synthetic")  # `choices=` for --dataset
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 2560, 512  # size of the generated "synthetic" set (32×32, 10 classes)

# Where each data set lives under --data-dir (the layouts of SPEC §5) and the official archive that --download
# fetches. Only the downloaded archive's MD5 is checked: extracted files are read as they are, so re-encoded copies
# with other checksums (e.g. ../shared/data) load too.
_IMAGE_SOURCES = {
    "cifar10": dict(title="CIFAR-10", folder="cifar-10-batches-py", num_classes=10, label_key="labels",
                    train=[f"data_batch_{k}" for k in range(1, 6)], test=["test_batch"],
                    expect="data_batch_1..5 and test_batch", size="170 MB",
                    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a"),
    "cifar100": dict(title="CIFAR-100", folder="cifar-100-python", num_classes=100, label_key="fine_labels",
                     train=["train"], test=["test"], expect="train and test", size="170 MB",
                     url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85"),
    "tinyimagenet": dict(title="Tiny ImageNet", folder="tiny-imagenet-200",
                         train=["wnids.txt", "train"], test=[os.path.join("val", "val_annotations.txt")],
                         expect="wnids.txt, train/ and val/val_annotations.txt", size="250 MB",
                         url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                         md5="90528d7ca1a48142e341f4ef8d21d0de"),
}

# Tags that give each consumer of (seed, index) its own random stream: epoch e's permutation and step e's
# augmentation must not share random numbers.
_PERMUTATION_STREAM, _AUGMENT_STREAM, _SYNTHETIC_STREAM = 1, 2, 3
_SYNTHETIC_SEED = 20230  # fixed: the synthetic set is the same whatever --seed a run uses

_TINY_IMAGENET_CACHE = "decoded_uint8.pt"  # decoded pixels, written beside the JPEGs after the first read
_DECODE_TASK = 256  # image files per thread-pool task


class ImageDataset(typing.NamedTuple):
    """A whole image-classification data set in memory, on one device.

    Images are uint8 N×3×H×W (RGB, 0..255; convert batches with images_to_float), labels int64 in [0, num_classes).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    name: str


def load_image_dataset(name, data_dir, download=False, n_train=None, device="cpu"):
    """Load an image data set (`name` in IMAGE_DATASETS) as an ImageDataset whose tensors live on `device`.

    - cifar10 / cifar100: the python pickles in <data_dir>/cifar-10-batches-py/ or <data_dir>/cifar-100-python/.
    - tinyimagenet: <data_dir>/tiny-imagenet-200/ (200 classes in wnids.txt order, 64×64; test set = the 10 000 val
      images). The JPEGs are decoded once and cached in tiny-imagenet-200/decoded_uint8.pt.
    - synthetic: a generated set (no files; data_dir is ignored), see synthetic_image_dataset.
    download=True fetches a missing data set from its official archive (MD5-checked) into data_dir. Missing data
    stops with a one-line error naming --data-dir (exit 2); a failed download with a one-line error (exit 1).
    n_train keeps the first n_train training images (None: all); too many stops with an error naming --n-train.
    """
    if name == "synthetic":
        data = synthetic_image_dataset()
    elif name in _IMAGE_SOURCES:
        folder = _locate_image_data(name, data_dir, download)
        data = _read_tiny_imagenet(folder) if name == "tinyimagenet" else _read_cifar(name, folder)
    else:
        raise ValueError(f"unknown image data set {name!r}; expected one of {IMAGE_DATASETS}")
    data = _keep_first_train(data, n_train)
    tensors = {field: getattr(data, field).to(device) for field in ImageDataset._fields[:4]}
    return data._replace(**tensors)


def _keep_first_train(data, n_train):
    """Keep the first n_train training images (a copy, so the rest can be freed); the test set is untouched."""
    available = len(data.train_labels)
    if n_train is None or n_train == available:
        return data
    if not 1 <= n_train <= available:
        usage_error("--n-train", f"{n_train} training images requested but {data.name} has {available}")
    return data._replace(train_images=data.train_images[:n_train].clone(),
                         train_labels=data.train_labels[:n_train].clone())


# ----------------------------------------------------------------------------------------------------------------------
# Finding and downloading the files
# ----------------------------------------------------------------------------------------------------------------------


def _image_data_present(source, folder):
    return all(os.path.exists(os.path.join(folder, path)) for path in source["train"] + source["test"])


def _locate_image_data(name, data_dir, download):
    """The data set's folder under data_dir, downloading it first if asked; a one-line usage error if it is missing."""
    source = _IMAGE_SOURCES[name]
    folder = os.path.join(data_dir, source["folder"])
    if not _image_data_present(source, folder) and download:
        _download_image_data(source, data_dir)
    if not _image_data_present(source, folder):
        usage_error("--data-dir", f"{source['title']} not found: expected {source['expect']} in {folder}; pass "
                                  f"--download to fetch it (about {source['size']}), or --data-dir pointing at a "
                                  f"folder that holds {source['folder']}/")
    return folder


def _download_image_data(source, data_dir):
    """Fetch and extract the official archive into data_dir (torchvision checks its MD5 before extracting).

    Any failure (no network, MD5 mismatch, full disk, missing torchvision) ends the run with one line and exit
    code 1: it is the environment that failed, not the command line (which gets exit code 2).
    """
    print(f"downloading {source['title']} (about {source['size']}) from {source['url']} into {data_dir}", flush=True)
    try:
        from torchvision.datasets.utils import download_and_extract_archive

        os.makedirs(data_dir, exist_ok=True)
        download_and_extract_archive(source["url"], download_root=data_dir, md5=source["md5"], remove_finished=True)
    except Exception as err:  # every cause gets the same one-line advice instead of a traceback
        reason = " ".join(str(err).split()) or type(err).__name__
        prog = os.path.basename(sys.argv[0]) or "python"
        sys.stderr.write(f"{prog}: error: downloading {source['title']} from {source['url']} failed ({reason}); "
                         f"fetch and extract it by hand so that {os.path.join(data_dir, source['folder'])}/ exists, "
                         f"or pass --data-dir pointing at a folder that holds {source['folder']}/\n")
        raise SystemExit(1) from None


# ----------------------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickles)
# ----------------------------------------------------------------------------------------------------------------------


def _read_cifar(name, folder):
    source = _IMAGE_SOURCES[name]
    train = [_read_cifar_file(os.path.join(folder, f), source) for f in source["train"]]
    test = [_read_cifar_file(os.path.join(folder, f), source) for f in source["test"]]
    return ImageDataset(train_images=torch.from_numpy(np.concatenate([images for images, _ in train])),
                        train_labels=torch.from_numpy(np.concatenate([labels for _, labels in train])),
                        test_images=torch.from_numpy(np.concatenate([images for images, _ in test])),
                        test_labels=torch.from_numpy(np.concatenate([labels for _, labels in test])),
                        num_classes=source["num_classes"], name=name)


def _read_cifar_file(path, source):
    """One CIFAR pickle -> (uint8 N×3×32×32, int64 N). Each row of `data` is the R, then G, then B 32×32 plane."""
    try:
        with open(path, "rb") as f:
            # latin1 decodes the byte strings of the original Python 2 pickles; files written by Python 3 load too
            entry = pickle.load(f, encoding="latin1")
        entry = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in entry.items()}
        data = np.ascontiguousarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry[source["label_key"]], dtype=np.int64)
    except Exception as err:  # a damaged or foreign file: one line naming it, not a traceback
        usage_error("--data-dir", f"{path} is not a readable {source['title']} file ({type(err).__name__}: {err})")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        usage_error("--data-dir", f"{path}: expected `data` of shape N×3072 and N labels, got {data.shape} and "
                                  f"{labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= source["num_classes"]):
        usage_error("--data-dir", f"{path}: labels outside 0..{source['num_classes'] - 1}")
    return data.reshape(-1, 3, 32, 32), labels


# ----------------------------------------------------------------------------------------------------------------------
# Tiny ImageNet (JPEG tree, decoded once into a cache)
# ----------------------------------------------------------------------------------------------------------------------


def _read_tiny_imagenet(folder):
    """Tiny ImageNet as an ImageDataset; pixels from the decode cache when it matches the file listing."""
    wnids, train_files, train_labels, test_files, test_labels = _tiny_imagenet_listing(folder)
    # The cache is valid for exactly this list of files, labels and order (any file added, removed or relabelled
    # changes the signature and triggers a fresh decode).
    signature = hashlib.sha256("\n".join(["v1", *wnids, *train_files, *test_files, str(train_labels.tolist()),
                                          str(test_labels.tolist())]).encode()).hexdigest()
    cache = os.path.join(folder, _TINY_IMAGENET_CACHE)
    images = _read_decode_cache(cache, signature)
    if images is None:
        print(f"decoding {len(train_files) + len(test_files)} Tiny ImageNet JPEGs once; cached in {cache}", flush=True)
        images = {"train": _decode_jpegs(folder, train_files), "test": _decode_jpegs(folder, test_files)}
        _write_decode_cache(cache, signature, images)
    return ImageDataset(train_images=images["train"], train_labels=torch.from_numpy(train_labels),
                        test_images=images["test"], test_labels=torch.from_numpy(test_labels),
                        num_classes=len(wnids), name="tinyimagenet")


def _tiny_imagenet_listing(folder):
    """(wnids, train files, train labels, val files, val labels), file paths relative to `folder`.

    Classes are numbered in wnids.txt order (200 in the real set). The training images are stored class-interleaved
    (the k-th image of every class, then the (k+1)-th, ...), so that any prefix (--n-train, or a fixed subset for
    measuring feature sparsity) is class-balanced, as CIFAR's is; every epoch is shuffled anyway.
    """
    with open(os.path.join(folder, "wnids.txt")) as f:
        wnids = [line.strip() for line in f if line.strip()]
    index = {wnid: k for k, wnid in enumerate(wnids)}
    files, labels, ranks = [], [], []
    for k, wnid in enumerate(wnids):
        image_dir = os.path.join("train", wnid, "images")
        if not os.path.isdir(os.path.join(folder, image_dir)):
            usage_error("--data-dir", f"{os.path.join(folder, image_dir)} is missing (class {wnid} of wnids.txt)")
        names = sorted(n for n in os.listdir(os.path.join(folder, image_dir)) if n.lower().endswith((".jpeg", ".jpg")))
        files += [os.path.join(image_dir, n) for n in names]
        labels += [k] * len(names)
        ranks += range(len(names))
    order = np.lexsort((labels, ranks))  # primary key: rank within the class; ties broken by class
    train_files, train_labels = [files[i] for i in order], np.asarray(labels, dtype=np.int64)[order]
    val_files, val_labels = [], []
    with open(os.path.join(folder, "val", "val_annotations.txt")) as f:
        for line in f:
            fields = line.rstrip("\r\n").split("\t")  # file, wnid, bounding box
            if len(fields) < 2:
                continue
            if fields[1] not in index:
                usage_error("--data-dir", f"val_annotations.txt labels {fields[0]} with {fields[1]}, not in wnids.txt")
            val_files.append(os.path.join("val", "images", fields[0]))
            val_labels.append(index[fields[1]])
    return wnids, train_files, train_labels, val_files, np.asarray(val_labels, dtype=np.int64)


def _decode_jpegs(folder, files, size=64):
    """Decode image files (paths relative to `folder`) into one uint8 N×3×size×size tensor, in a thread pool.

    PIL's convert("RGB") turns greyscale JPEGs (the real set has some) into 3 equal channels. Speed: ~190 µs per
    64×64 JPEG on one core of the 2-core development CPU (~20 s for Tiny ImageNet's 110 000 files, once: later reads
    use the cache); PIL releases the GIL while decoding, so threads scale on bigger machines. (torchvision.io's
    decode_jpeg measured ~3× faster, with identical pixels, but is deprecated since torchvision 0.29.)
    """
    from PIL import Image

    pixels = np.empty((len(files), size, size, 3), dtype=np.uint8)

    def decode(start):  # one task = a run of files; returns the first problem as a message, or None
        for i in range(start, min(start + _DECODE_TASK, len(files))):
            path = os.path.join(folder, files[i])
            try:
                with Image.open(path) as image:
                    decoded = np.asarray(image.convert("RGB"))
            except (OSError, ValueError) as err:  # includes PIL.UnidentifiedImageError
                return f"cannot decode {path} ({err})"
            if decoded.shape != (size, size, 3):
                return f"{path} is {decoded.shape[1]}×{decoded.shape[0]} pixels, expected {size}×{size}"
            pixels[i] = decoded
        return None

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = [p for p in pool.map(decode, range(0, len(files), _DECODE_TASK)) if p]
    if problems:
        usage_error("--data-dir", problems[0])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()  # H×W×3 -> 3×H×W


def _read_decode_cache(path, signature):
    """{"train": uint8 tensor, "test": uint8 tensor} from the cache, or None if it is absent, stale or unreadable.

    A torch file (weights_only: tensors and strings, no code): the full 1.35 GB Tiny ImageNet cache reads in ~1 s,
    against ~6 s for the same arrays in an .npz (whose zip reader checks CRCs in Python-sized chunks).
    """
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
        if cache["signature"] != signature:
            return None
        return {"train": cache["train"], "test": cache["test"]}
    except Exception:  # missing or damaged cache: decode again and rewrite it
        return None


def _write_decode_cache(path, signature, images):
    """Write the cache atomically (temp file + rename); a read-only data folder only costs a re-decode next time."""
    folder = os.path.dirname(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save({"signature": signature, **images}, f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; others sharing the data folder may read the cache too
        os.replace(tmp, path)
    except OSError as err:
        print(f"note: could not write the decode cache {path} ({err.strerror or err}); decoding again next time")
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic set (tests and offline demos)
# ----------------------------------------------------------------------------------------------------------------------


def synthetic_image_dataset():
    """A generated 10-class set of 32×32 RGB images: SYNTHETIC_TRAIN (2 560) train / SYNTHETIC_TEST (512) test images.

    Class c has its own mean colour and its own sinusoidal stripes (orientation c·18°, 2, 3 or 4 periods per image,
    a stripe colour); an image is its class's stripes at a random phase (i.e. randomly shifted) plus Gaussian pixel
    noise of std 0.25 (a quarter of the pixel range). Labels cycle 0..9, so every prefix of 10k images is balanced.
    Learnable but not trivial: a nearest-class-mean classifier gets ~89 % test accuracy; a 2-layer conv net trained
    for 4 epochs with augment_batch reaches ~31 % test error (chance: 90 %). Deterministic: a fixed data seed,
    independent of the training --seed.
    """
    generator = torch.Generator().manual_seed(_stream_seed(_SYNTHETIC_STREAM, _SYNTHETIC_SEED, 0))
    colours, stripe_colours = torch.randn(2, 10, 3, 1, 1, generator=generator)
    angles = torch.arange(10) * math.pi / 10
    frequencies = 2 * math.pi * (2 + torch.arange(10) % 3) / 32  # radians per pixel
    n_total = SYNTHETIC_TRAIN + SYNTHETIC_TEST
    labels = torch.arange(n_total) % 10
    phases = 2 * math.pi * torch.rand(n_total, 1, 1, generator=generator)
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    along = x * angles.cos()[labels, None, None] + y * angles.sin()[labels, None, None]  # N×32×32
    stripes = torch.sin(frequencies[labels, None, None] * along + phases)
    images = 0.5 + 0.05 * colours[labels] + 0.1 * stripes[:, None] * stripe_colours[labels]
    images = images + 0.25 * torch.randn(n_total, 3, 32, 32, generator=generator)
    images = (255 * images).round().clamp(0, 255).to(torch.uint8)
    return ImageDataset(train_images=images[:SYNTHETIC_TRAIN].clone(), train_labels=labels[:SYNTHETIC_TRAIN].clone(),
                        test_images=images[SYNTHETIC_TRAIN:].clone(), test_labels=labels[SYNTHETIC_TRAIN:].clone(),
                        num_classes=10, name="synthetic")


# ----------------------------------------------------------------------------------------------------------------------
# Batches: shuffling, augmentation, conversion
# ----------------------------------------------------------------------------------------------------------------------


def _stream_seed(stream, seed, index):
    """A 63-bit torch seed that is a pure function of (stream, seed, index).

    numpy's SeedSequence hashes the three integers, so nearby (seed, index) pairs give unrelated streams.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    high, low = np.random.SeedSequence([stream, seed, index]).generate_state(2, dtype=np.uint32)
    return (int(high) & 0x7FFFFFFF) << 32 | int(low)


def epoch_permutation(n, epoch, seed, device="cpu"):
    """The order in which epoch `epoch` visits the n training images: a pure function of (seed, epoch).

    Stateless, so a run resumed at epoch e replays exactly the batches of an uninterrupted run. Drawn on the CPU
    (then moved to `device`), so CPU and GPU runs with the same seed see the same batches.
    """
    generator = torch.Generator().manual_seed(_stream_seed(_PERMUTATION_STREAM, seed, epoch))
    return torch.randperm(n, generator=generator).to(device)


def augment_batch(images, seed, step, padding=4):
    """Random crop with `padding` zero pixels on each side (output the input size) and random horizontal flip.

    The standard CIFAR augmentation of the authors' code (RandomCrop(32, padding=4) + RandomHorizontalFlip): the
    crop's top-left corner is uniform in {0..2·padding}² of the zero-padded image and each image is mirrored with
    probability 1/2. Vectorised over the batch on its own device (one gather, no per-image loop). The random numbers
    are a pure function of (seed, step), drawn on the CPU, so resumed and CPU/GPU runs augment identically.
    images: uint8 (or float) B×C×H×W. Returns a new tensor of the same shape, dtype and device.
    """
    n, _, height, width = images.shape
    generator = torch.Generator().manual_seed(_stream_seed(_AUGMENT_STREAM, seed, step))
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    flips = torch.randint(0, 2, (1, n), generator=generator)
    top, left, flip = torch.cat([offsets, flips]).to(images.device)  # one host-to-device copy
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    return _crop_windows(padded, top, left, flip == 1, height, width)


def _crop_windows(padded, top, left, flip, height, width):
    """Window [top_i : top_i + height, left_i : left_i + width] of each image i of `padded`, mirrored where flip_i.

    One gather with per-image flat pixel indices: output pixel (y, x) of image i reads padded pixel
    (top_i + y, left_i + x), or (top_i + y, left_i + width − 1 − x) when mirrored.
    """
    n, channels, _, padded_width = padded.shape
    rows = top[:, None] + torch.arange(height, device=padded.device)
    cols = left[:, None] + torch.arange(width, device=padded.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    index = (rows[:, :, None] * padded_width + cols[:, None, :]).reshape(n, 1, height * width)
    windows = padded.reshape(n, channels, -1).gather(2, index.expand(n, channels, height * width))
    return windows.reshape(n, channels, height, width)


def images_to_float(images, channels_last=False):
    """uint8 images -> float32 in [0, 1] (x / 255; no per-channel normalisation, SPEC §4), optionally channels_last.

    One kernel: the division writes straight into an output of the wanted memory format (reordering the uint8
    batch first, then dividing, measured ~1.5× slower on CPU).
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=memory_format)
    return torch.div(images, 255, out=out)
