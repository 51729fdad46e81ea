"""What the command line accepts, and the checks that need no model: the parser, the profiles, the list options
and the rules for every number. Pure Python (no torch): the entry point answers ``--help`` and bad input from here
in a fraction of a second, and the commands use the same definitions.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path
from typing import Optional

USAGE = """``peft-loran``: fine-tune LoRA and LoRAN side by side, train or evaluate one adapter, inspect an adapter.

    peft-loran compare                      # quick profile: MiniLM on BBC News topics, LoRA vs LoRAN, minutes on a CPU
    peft-loran compare --profile paper      # the paper's settings on SmolLM2-135M (hours on a CPU)
    peft-loran compare --methods lora,loran,sine --rank 1,4 --seed 0,1,2 --output-dir runs/sweep   # a grid
    peft-loran train --method loran --task bbc-headline --model smollm2 --output-dir runs/headline
    peft-loran evaluate runs/headline/adapter --task bbc-headline
    peft-loran inspect runs/compare/adapters/loran
    peft-loran export runs/headline/adapter --to-lora 8 --output-dir runs/headline-lora
    peft-loran export runs/headline/adapter --merge --output-dir runs/headline-merged

User errors end with one line ``error: ...`` and exit code 2; Ctrl-C ends with exit code 130. Output directories
are built under a temporary name and renamed into place when complete, so an existing result is never replaced
by a partial one.
"""

PROFILES = {
    # a real result in a few minutes on 2 CPU cores: a 22M-parameter encoder on a 5-way topic task
    "quick": dict(model="minilm", task="bbc-topic", rank=8, alpha=16, dropout=0.05, steps=150, batch_size=8,
                  max_length=128, lr=2e-3),
    # the paper's adapter settings (r=64, alpha=16, dropout=0.2, q_proj/v_proj, Sinter a=5e-5, w=1e4) on SmolLM2
    "paper": dict(model="smollm2", task="bbc-topic", rank=64, alpha=16, dropout=0.2, steps=1000, batch_size=8,
                  max_length=256, lr=2e-4, targets=["q_proj", "v_proj"]),
}


def _add_common(p: argparse.ArgumentParser, with_methods: bool = False) -> None:
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                   help="defaults for everything below (quick: minutes on a CPU; paper: the paper's settings)")
    p.add_argument("--model", help="'minilm', 'smollm2', a local model directory, or a hub id when online")
    p.add_argument("--task", help="bbc-topic, bbc-headline or news-headline (ignored with --train-file)")
    p.add_argument("--train-file", help="your own data: JSONL or CSV")
    p.add_argument("--eval-file", help="your own evaluation data (default: a seeded split of --train-file)")
    p.add_argument("--task-type", choices=["classify", "generate"], default="classify",
                   help="with --train-file: classification (text/label) or generation (source/target)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--source-field", default="source")
    p.add_argument("--target-field", default="target")
    several = " (compare: several, comma-separated, run as a grid)" if with_methods else ""
    if with_methods:
        p.add_argument("--methods", default="lora,loran",
                       help="comma-separated: lora, rslora, dora, hira (PEFT), loran, sine (Sine-LoRA), "
                            "loran:<activation> (default: lora,loran)")
    p.add_argument("--rank", help="rank r" + several)
    p.add_argument("--alpha", type=float)
    p.add_argument("--dropout", type=float)
    p.add_argument("--targets", help="comma-separated module names (default: the model's q/v projections)")
    p.add_argument("--steps", type=int, help="optimizer steps per method")
    p.add_argument("--epochs", type=float, help="passes over the training data per method (instead of --steps)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--lr", help="learning rate" + several)
    p.add_argument("--seed", help="training seed" + (" (compare: several, comma-separated: 0,1,2)" if with_methods else ""))
    p.add_argument("--eval-limit", type=int, help="evaluate on at most this many test examples")
    p.add_argument("--eval-split", choices=["test", "validation"],
                   help="evaluate on the test split (default) or on the validation split, to choose settings such as "
                        "the learning rate without looking at the test split")
    p.add_argument("--sinter-amplitude", help="Sinter's a (paper: 5e-5)" + several)
    p.add_argument("--sinter-frequency", help="Sinter's w (paper: 1e4)" + several)
    p.add_argument("--sine-frequency", help="Sine-LoRA's w (default 200)" + several)
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA: nf4 base with double quantization")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory (when complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, only the result")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-loran", description=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_common(sub.add_parser("compare", help="train LoRA, LoRAN and other methods with identical budgets (a "
                               "resumable grid over ranks, learning rates and seeds) and compare them"), True)
    train = sub.add_parser("train", help="train one method and save its adapter (PEFT format)")
    train.add_argument("--method", default="loran",
                       help="lora, rslora, dora, hira (PEFT), loran, sine (Sine-LoRA) or loran:<activation>")
    _add_common(train)
    ev = sub.add_parser("evaluate", help="evaluate a saved adapter (ours or an original MLORA one) on a task")
    ev.add_argument("adapter")
    ev.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    ev.add_argument("--task", help="a bundled task (default: what the adapter was trained on)")
    ev.add_argument("--eval-file", help="your own JSONL/CSV, read with the field names the adapter was trained with")
    ev.add_argument("--task-type", choices=["classify", "generate"],
                    help="with --eval-file, for adapters that record no task (e.g. the original code's; default "
                         "generate); others must match what the adapter was trained for")
    for name, kind in (("text", "classification"), ("label", "classification"), ("source", "generation"),
                       ("target", "generation")):
        ev.add_argument(f"--{name}-field", help=f"with --eval-file: the file's {name} field ({kind} adapters; "
                                                 "default: the name the adapter was trained with)")
    ev.add_argument("--load-in-4bit", action="store_true",
                    help="load the base in 4-bit NF4 (default: as the run loaded it, which its task record says)")
    ev.add_argument("--eval-limit", type=int)
    ev.add_argument("--max-length", type=int, help="default: the one the adapter was trained with (else 128)")
    ev.add_argument("--quiet", action="store_true")
    exp = sub.add_parser("export", help="export a LoRAN adapter as a standard LoRA adapter or as a merged model")
    exp.add_argument("adapter")
    how = exp.add_mutually_exclusive_group(required=True)
    how.add_argument("--to-lora", metavar="RANK",
                     help="write a PEFT LoRA adapter of this rank (an integer, or auto:TOL for the smallest rank per "
                          "module whose relative error is at most TOL)")
    how.add_argument("--merge", action="store_true", help="write a complete transformers model with the update merged")
    exp.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    exp.add_argument("--load-in-4bit", action="store_true",
                     help="load the base in 4-bit NF4 (default: as the run loaded it, which its task record says); "
                          "--merge then dequantizes, merges in float32 and saves bf16")
    exp.add_argument("--output-dir", required=True)
    exp.add_argument("--overwrite", action="store_true", help="replace an existing output directory (when complete)")
    exp.add_argument("--quiet", action="store_true")
    ins = sub.add_parser("inspect", help="config, size and singular-value spectrum of an adapter's updates")
    ins.add_argument("adapter")
    ins.add_argument("--output", help="PNG path (default: <adapter>-spectrum.png beside the adapter folder); an "
                                      "existing file is replaced only if it is a plot peft-loran wrote")
    ins.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    ins.add_argument("--load-in-4bit", action="store_true",
                     help="load the base in 4-bit NF4 (default: as the run loaded it)")
    ins.add_argument("--quiet", action="store_true")
    return parser



#: Options that take a comma-separated list in ``compare`` (a grid), with the type of their values.
LIST_OPTIONS = {"rank": int, "lr": float, "seed": int, "sinter_amplitude": float, "sinter_frequency": float,
                "sine_frequency": float}
#: The settings that change from cell to cell of a sweep (every other setting is the same for all cells).
GRID_OPTIONS = tuple(LIST_OPTIONS)
#: Their short names in cell folders and plot labels.
SHORT_NAMES = {"rank": "r", "lr": "lr", "seed": "s", "sinter_amplitude": "a", "sinter_frequency": "w",
               "sine_frequency": "w"}
#: A file in a compare output directory that makes it resumable (see peft_loran_cli.commands.cmd_compare).
SWEEP_STATE = "sweep.json"


def option_values(args: argparse.Namespace, name: str) -> Optional[list]:
    """The values of a list option (None when not given); ValueError with the message for the user."""
    given = getattr(args, name, None)
    if given is None:
        return None
    kind = LIST_OPTIONS[name]
    flag = "--" + name.replace("_", "-")
    try:
        values = [kind(v) for v in str(given).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        example = "0,1,2" if kind is int else "1e-4,3e-4"
        raise ValueError(f"{flag} must be {'an integer' if kind is int else 'a number'} or a comma-separated list "
                         f"such as {example}, got '{given}'")
    if len(set(values)) != len(values):
        raise ValueError(f"{flag} lists a value twice: '{given}'")
    if len(values) > 1 and args.command != "compare":
        raise ValueError(f"{args.command} runs one {name.replace('_', ' ')}, got {flag} {given}; use compare for "
                         "several")
    return values


def checked_values(args: argparse.Namespace, name: str) -> Optional[list]:
    """:func:`option_values`, its problem as one ``error:`` line."""
    from .errors import UserError

    try:
        return option_values(args, name)
    except ValueError as exc:
        raise UserError(str(exc)) from None


#: What each number must be: (test, what it must be). One definition for the early checks and ``Settings.check``.
NUMBER_RULES = {
    "rank": (lambda v: v > 0, "a positive integer"),
    "alpha": (lambda v: v > 0 and math.isfinite(v), "a positive number"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "steps": (lambda v: v > 0, "positive"),
    "epochs": (lambda v: v > 0 and math.isfinite(v), "a positive number"),
    "batch_size": (lambda v: v > 0, "positive"),
    "grad_accum": (lambda v: v > 0, "positive"),
    "max_length": (lambda v: v > 0, "positive"),
    "gen_tokens": (lambda v: v > 0, "positive"),
    "eval_limit": (lambda v: v > 0, "positive"),
    "lr": (lambda v: v > 0 and math.isfinite(v), "a positive number"),
    "sinter_amplitude": (math.isfinite, "a finite number"),
    "sinter_frequency": (math.isfinite, "a finite number"),
    "sine_frequency": (lambda v: v != 0 and math.isfinite(v), "a finite non-zero number"),
}


def number_problem(name: str, value) -> Optional[str]:
    """The message for a number that breaks its rule (:data:`NUMBER_RULES`), or None."""
    rule = NUMBER_RULES.get(name)
    if value is None or rule is None or rule[0](value):
        return None
    return f"--{name.replace('_', '-')} must be {rule[1]}, got {value:g}"


def early_problem(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with the arguments that can be told without loading anything, or None."""
    for name in ("train_file", "eval_file"):
        path = getattr(args, name, None)
        if path and not Path(path).is_file():
            return f"data file not found: {path}"
    for name in LIST_OPTIONS:
        try:
            values = option_values(args, name)
        except ValueError as exc:
            return str(exc)
        for value in values or []:
            if number_problem(name, value):
                return number_problem(name, value)
    for name in NUMBER_RULES:
        if name not in LIST_OPTIONS and number_problem(name, getattr(args, name, None)):
            return number_problem(name, getattr(args, name))
    return (combination_problem(args) or files_problem(args) or output_problem(args))


def combination_problem(args: argparse.Namespace) -> Optional[str]:
    """Settings that contradict each other or are ignored where the user would expect them to count."""
    if args.command in ("compare", "train"):
        if args.task and args.train_file:
            return "give --task (a bundled task) or --train-file (your data), not both"
        if args.eval_file and not args.train_file:
            return ("--eval-file needs --train-file: a bundled task is scored on its own test split (evaluate a saved "
                    "adapter on your file with `peft-loran evaluate ADAPTER --eval-file FILE`)")
        if args.steps is not None and args.epochs is not None:
            return "give --steps or --epochs, not both"
        if args.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
            return "--load-in-4bit needs bitsandbytes: pip install bitsandbytes (or peft-loran[quant])"
    if args.command == "compare":
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not methods or len(set(methods)) != len(methods):
            return f"--methods must list distinct methods, got '{args.methods}'"
    if args.command == "export" and args.to_lora is not None:
        from .light import library_module

        try:
            library_module("rank_spec").parse_rank(args.to_lora)
        except ValueError as exc:
            return f"--to-lora: {exc}"
    return None


def files_problem(args: argparse.Namespace) -> Optional[str]:
    """A damaged adapter or base model file (truncated weights, a broken header), named in one line."""
    from .files import adapter_problem, model_problem
    from .files import recorded_base

    adapter = getattr(args, "adapter", None)
    if adapter:
        problem = adapter_problem(adapter)
        if problem:
            return problem
    return model_problem(getattr(args, "model", None) or (recorded_base(adapter) if adapter else None))


def output_problem(args: argparse.Namespace) -> Optional[str]:
    """An ``--output-dir`` (or inspect's ``--output``) that may not be written: it exists without ``--overwrite``,
    or replacing it would remove something peft-loran did not write (a folder of the user's, the working folder or
    an ancestor of it or of an input). Checked with the same rules the writing itself enforces."""
    from .files import input_paths, is_our_plot
    from .outputs import OutputFolder

    if args.command == "inspect":
        output = Path(args.output) if args.output else None
        if output is not None and output.exists() and not (output.is_file() and is_our_plot(output)):
            return (f"--output {output} exists and is not a plot peft-loran wrote; choose another --output "
                    "(nothing was replaced)")
        return None
    output = getattr(args, "output_dir", None)
    if not output:
        return None
    resumable = args.command == "compare" and (Path(output) / SWEEP_STATE).exists()
    return OutputFolder(output, input_paths(args)).problem(getattr(args, "overwrite", False), resumable)


def prepare_data(args: argparse.Namespace) -> None:
    """Read and check the data the command will use (the user's files, a bundled task, an adapter's task record),
    before any model is loaded: ``args.task_data`` (and ``args.task_record`` for ``evaluate``); print what the user
    should know about it (``warning:`` / ``note:`` lines, also with --quiet). Pure Python, so a bad file is reported
    in a fraction of a second. Raises UserError."""
    from .data import evaluation_task_from, task_from
    from .files import read_task_record
    from .models import check_model_spec, generation_model_problem

    if args.command in ("compare", "train"):
        model = args.model or PROFILES[args.profile]["model"]
        from .bundles import require

        require(model, *([] if args.train_file else [args.task or PROFILES[args.profile]["task"]]))
        check_model_spec(model)
        args.task_data = task_from(args, PROFILES[args.profile]["task"])
        problem = generation_model_problem(model, args.task_data.kind, args.task_data.name)
        if problem:
            from .errors import UserError

            raise UserError(problem)
    elif args.command == "evaluate":
        args.task_record = read_task_record(args.adapter)
        args.task_data = evaluation_task_from(args, args.task_record)
    if args.command in ("evaluate", "export", "inspect") and args.model:
        check_model_spec(args.model)
    task = getattr(args, "task_data", None)
    for line in (task.warnings if task else []):
        print(f"warning: {line}", file=sys.stderr)
    for line in (task.notes if task else []):
        print(f"note: {line}", file=sys.stderr)
