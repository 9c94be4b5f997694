"""Sweeps as a plain list of commands, one run per line: write the list, pick one line (a SLURM array task), or run
the whole list on one machine with one run per GPU. Standard library only; see the README, "Many processes and
clusters".

    python sweep.py expand --lr 0.5 0.75 --large-lr-frac 0.1 0.3 0.5 --seeds 0 1 2 \\
        -- --warmup-exp 1.05 --data-dir ~/data > sweep.txt       # 18 commands, each with --out-dir runs/sweep
    python sweep.py count sweep.txt                              # 18
    python sweep.py pick sweep.txt 4                             # the 5th command (0-based, as SLURM array ids)
    sbatch --array=0-17 sweep.sbatch sweep.txt                   # one SLURM array task per command
    python sweep.py run sweep.txt --gpus 0 1 2 3                 # one machine: a run per GPU until all are done
    python plots.py --logs runs/sweep --out-dir figures          # every run's JSON log is in the one folder

A list is a text file with one shell command per line; blank lines and lines starting with # are not commands (so a
list can be edited by hand: comment a line out, add one). `pick` and `run` count only the commands.
"""
import argparse
import itertools
import os
import shlex
import subprocess
import sys
import time


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`sweep.py: error: ... (see --help)`, exit code 2), as the other scripts."""

    def error(self, message):
        if message.startswith("unrecognized arguments"):
            message += "; the flags every command gets go after --"
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def expand(script, lrs, large_lr_fracs, seeds, out_dir, flags=()):
    """The commands of a sweep: one `python SCRIPT` per (lr, large-lr-frac, seed), in that nesting order, each with
    the same extra `flags` and the shared --out-dir; shell-quoted, so that a line is one command for `bash -c`."""
    return [shlex.join(["python", script, "--lr", lr, "--large-lr-frac", frac, "--seed", seed, *flags,
                        "--out-dir", out_dir])
            for lr, frac, seed in itertools.product(lrs, large_lr_fracs, seeds)]


def read_commands(path):
    """The commands of a list file: its lines without surrounding spaces, blank lines and # comments left out."""
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def pick(commands, index):
    """Command number `index` (0-based), or ValueError naming the valid range."""
    if not 0 <= index < len(commands):
        raise ValueError(f"index {index} is outside the list's {len(commands)} commands (0 to {len(commands) - 1})")
    return commands[index]


def run_on_gpus(commands, gpus, poll_seconds=0.2):
    """Run the commands through bash, at most one per GPU at a time (CUDA_VISIBLE_DEVICES=that GPU, so each run sees
    one device), the next command starting on whichever GPU is free first. Returns the commands that failed, as
    (exit code, command). Ctrl-C reaches the runs too (they checkpoint and stop): this waits for them, then
    re-raises."""
    waiting, running, failed = list(commands), {}, []  # running: GPU -> (process, command)
    try:
        while waiting or running:
            for gpu in gpus:
                if gpu not in running and waiting:
                    command = waiting.pop(0)
                    print(f"[GPU {gpu}] {command}", flush=True)
                    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
                    running[gpu] = (subprocess.Popen(["bash", "-c", command], env=env), command)
            for gpu, (process, command) in list(running.items()):
                if process.poll() is not None:
                    del running[gpu]
                    if process.returncode:
                        failed.append((process.returncode, command))
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        for process, _ in running.values():
            process.wait()
        raise
    return failed


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{expand,count,pick,run}")
    grid = commands.add_parser("expand", help="print the commands of a grid (lr × large-lr-frac × seed)")
    grid.add_argument("--script", default="train_resnet.py", help="the experiment script every command runs")
    grid.add_argument("--lr", nargs="+", required=True, help="the step sizes η0 (--lr of the script)")
    grid.add_argument("--large-lr-frac", nargs="+", default=["0.5"], help="the large-step fractions T")
    grid.add_argument("--seeds", nargs="+", default=["0"], help="the seeds")
    grid.add_argument("--out-dir", default=os.path.join("runs", "sweep"),
                      help="the one folder where every run writes its JSON log (and checkpoint)")
    grid.add_argument("flags", nargs="*", help="after --: flags added to every command, e.g. -- --epochs 30")
    count = commands.add_parser("count", help="print the number of commands of a list (an array of 0 to count − 1)")
    count.add_argument("list", help="the list file")
    one = commands.add_parser("pick", help="print one command of a list")
    one.add_argument("list", help="the list file")
    one.add_argument("index", type=int, help="0-based, blank lines and comments not counted (SLURM_ARRAY_TASK_ID)")
    local = commands.add_parser("run", help="run every command of a list on this machine, one per GPU at a time")
    local.add_argument("list", help="the list file")
    local.add_argument("--gpus", nargs="+", required=True, help="the GPU ids to use, e.g. 0 1 2 3 (one run each)")
    args = parser.parse_args(argv)

    if args.command == "expand":
        print("# " + shlex.join(["python", "sweep.py", *(sys.argv[1:] if argv is None else argv)]))
        print("\n".join(expand(args.script, args.lr, args.large_lr_frac, args.seeds, args.out_dir, args.flags)))
        return 0
    try:
        listed = read_commands(args.list)
    except OSError as err:
        parser.error(f"argument list: cannot read {args.list!r} ({err.strerror or err})")
    if args.command == "count":
        print(len(listed))
    elif args.command == "pick":
        try:
            print(pick(listed, args.index))
        except ValueError as err:
            parser.error(f"argument index: {err}")
    else:
        try:
            failed = run_on_gpus(listed, args.gpus)
        except KeyboardInterrupt:
            return 130
        for code, command in failed:
            print(f"failed (exit code {code}): {command}", file=sys.stderr)
        print(f"{len(listed) - len(failed)} of {len(listed)} commands succeeded", flush=True)
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
