"""The commands of ``peft-loran``: train, evaluate, inspect, export (``compare`` is in :mod:`.sweep`). The parser, the
usage text and the checks that need no model are in :mod:`.options`; the entry point (:func:`peft_loran_cli.main`)
runs them first, then :func:`run`. Models are loaded by :mod:`.loading`, output folders written through
:class:`.outputs.OutputFolder`.

User errors end with one line ``error: ...`` and exit code 2; Ctrl-C ends with exit code 130.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import UserError
from .settings import settings_from


def _output_folder(args: argparse.Namespace):
    from .files import input_paths
    from .outputs import OutputFolder

    return OutputFolder(args.output_dir, input_paths(args))


def cmd_train(args: argparse.Namespace) -> int:
    from .evaluation import main_metric, sample_lines, score_details, split_name
    from .models import resolve_model
    from .targets import check_adapter_plan
    from .training import train

    settings = settings_from(args)
    task = args.task_data
    check_adapter_plan(settings.model, None, [args.method], [settings.rank], settings, task)
    model_path = resolve_model(settings.model, quiet=settings.quiet)
    with _output_folder(args).staged(args.overwrite) as out:
        result = train(args.method, task, settings, model_path, out / "adapter").as_dict()
        (out / "metrics.json").write_text(json.dumps({"task": task.name, "task_kind": task.kind, "labels": task.labels,
                                                      "model": model_path, **result}, indent=2, default=str) + "\n")
    metric, metrics = main_metric(task.kind), result["metrics"]
    details = "".join(f"; {d}" for d in score_details(metrics))
    print(f"{args.method}: {metric} {metrics[metric]:.4f} on {metrics['n']} {split_name(task, settings)} examples"
          f"{details}; adapter saved to {args.output_dir}/adapter")
    for line in sample_lines(result["metrics"]):
        print(line)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate, main_metric, sample_lines, score_details, split_name
    from .loading import cap_max_length, load_adapter_model, needs_tokenizer
    from .settings import Settings

    record, task = args.task_record, args.task_data
    loaded = load_adapter_model(args.adapter, args.model, args.load_in_4bit, args.quiet)
    max_length = args.max_length or (record or {}).get("max_length") or 128
    same_data = not (args.task or args.eval_file)  # the run's own data: score the examples the run scored
    eval_limit = args.eval_limit or ((record or {}).get("eval_limit") if same_data and not task.scored_split else None)
    eval_split = (record or {}).get("eval_split", "test") if same_data else "test"
    settings = Settings(eval_limit=eval_limit, eval_split=eval_split, max_length=max_length, quiet=args.quiet)
    if args.eval_limit and task.scored_split:
        task.test = task.test[: args.eval_limit]
    cap_max_length(settings, loaded.model)
    metrics = evaluate(loaded.model, needs_tokenizer(loaded.tokenizer, loaded.base_path), task, settings,
                       train_label_counts=(record or {}).get("train_label_counts"))
    metric = main_metric(task.kind)
    print(json.dumps({k: v for k, v in metrics.items() if k != "samples"}))
    what = f"{split_name(task, settings)} examples of {task.name}" if not args.eval_file else f"examples of {task.name}"
    caveat = f"; {task.caveat}" if task.caveat else ""
    details = "".join(f"{d}; " for d in score_details(metrics))
    print(f"{metric}: {metrics[metric]:.4f} on {metrics['n']} {what} ({details}base model loaded in "
          f"{loaded.loading.describe()}{caveat})")
    for line in sample_lines(metrics):
        print(line)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect_adapter, print_summary, spectrum_plot_path

    output = spectrum_plot_path(args.adapter, args.output)
    summary = inspect_adapter(args.adapter, output, model=args.model, load_in_4bit=args.load_in_4bit,
                              quiet=args.quiet)
    print_summary(args.adapter, summary)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import peft_loran

    from .exporting import export_merged_model, export_to_lora
    from .loading import adapter_config, load_adapter_model

    config = adapter_config(args.adapter)
    if not isinstance(config, peft_loran.LoranConfig):
        raise UserError(f"{args.adapter} is a {getattr(config.peft_type, 'value', config.peft_type)} adapter, not "
                        "LoRAN: it needs no export (serve it as it is)")
    loaded = load_adapter_model(args.adapter, args.model, args.load_in_4bit, args.quiet)
    folder = _output_folder(args)
    if args.to_lora is not None:
        export_to_lora(loaded, args.to_lora, folder, args.overwrite)
    else:
        export_merged_model(loaded, folder, args.overwrite)
    return 0


def main_command(args: argparse.Namespace):
    from .sweep import cmd_compare

    return {"compare": cmd_compare, "train": cmd_train, "evaluate": cmd_evaluate, "export": cmd_export,
            "inspect": cmd_inspect}[args.command]


def run(args: argparse.Namespace) -> None:
    """Run a parsed command (``peft_loran_cli.main`` parses and checks the arguments first)."""
    from .training import quiet_libraries

    quiet_libraries(getattr(args, "quiet", False))
    try:
        code = main_command(args)(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        where = getattr(args, "output_dir", None)
        note = f"; nothing was written to {where}" if where else ""
        if args.command == "compare":
            note = f"; finished cells are kept in {where}: run the same command to resume"
        start = "" if getattr(args, "quiet", False) else "\n"  # a progress bar may have been cut mid-line
        print(f"{start}interrupted{note}", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
