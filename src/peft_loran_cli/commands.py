"""The commands of ``peft-loran`` (compare, train, evaluate, export, inspect). The parser, the usage text and the
checks that need no model are in :mod:`.options`; the entry point (:func:`peft_loran_cli.main`) runs them first,
then :func:`run`.

User errors end with one line ``error: ...`` and exit code 2; Ctrl-C ends with exit code 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Iterator, Optional

from .errors import UserError
from .options import GRID_OPTIONS, LIST_OPTIONS, PROFILES, SHORT_NAMES, SWEEP_STATE, option_values

# ---------------------------------------------------------------------------------------------- settings
def settings_from(args: argparse.Namespace):
    """The run's Settings: the profile's defaults, then what was given (the first value of a list option)."""
    from .training import Settings

    values = dict(PROFILES[args.profile])
    values.pop("task", None)
    for f in fields(Settings):
        given = getattr(args, f.name, None)
        if f.name in LIST_OPTIONS:
            given = (_checked_values(args, f.name) or [None])[0]
        if given is not None and given is not False:
            values[f.name] = given
    if isinstance(values.get("targets"), str):
        values["targets"] = [t.strip() for t in values["targets"].split(",") if t.strip()]
    settings = Settings(**{k: v for k, v in values.items() if k in {f.name for f in fields(Settings)}})
    settings.quiet = bool(args.quiet)
    settings.command = getattr(args, "command_line", "peft-loran")
    settings.check()
    return settings


def _checked_values(args: argparse.Namespace, name: str) -> Optional[list]:
    try:
        return option_values(args, name)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def seeds_from(args: argparse.Namespace) -> list[int]:
    return _checked_values(args, "seed") or [0]


# -------------------------------------------------------------------------------------------- output dirs
@contextmanager
def staged_output(final: str, overwrite: bool, inputs: list[str]) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; it becomes ``final`` only when the block completes (replacing
    only what peft-loran wrote there, never one of the command's ``inputs``)."""
    with _output_errors(final):
        from peft_loran._atomic import atomic_directory

        with atomic_directory(final, overwrite=overwrite, inputs=inputs) as tmp:
            yield tmp


@contextmanager
def _output_errors(final: str) -> Iterator[None]:
    """An output directory that exists, is being written, or may not be replaced: one ``error:`` line."""
    from peft_loran._atomic import DirectoryInUseError, UnsafeOverwriteError

    try:
        yield
    except FileExistsError:
        raise UserError(f"output directory {final} exists; pass --overwrite to replace it") from None
    except UnsafeOverwriteError as exc:
        raise UserError(str(exc)) from None
    except DirectoryInUseError as exc:
        raise UserError(f"{exc}; wait for it to finish or choose another --output-dir") from None


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------------------ commands

def sweep_cells(args: argparse.Namespace, settings, methods: list[str]) -> list[dict]:
    """Every cell of the grid: methods x ranks x learning rates x seeds, times the activation parameters for the
    methods that use them. A cell is a dict of its method and its grid settings."""
    from itertools import product

    from peft_loran.activations import parameter_fields

    from .methods import parse_method

    values = {name: _checked_values(args, name) or [getattr(settings, name)] for name in GRID_OPTIONS}
    cells = []
    for seed, rank, lr, method in product(values["seed"], values["rank"], values["lr"], methods):
        kind, activation = parse_method(method)
        used = parameter_fields().get(activation or "sinter", ()) if kind == "loran" else ()
        for params in product(*(values[p] for p in used)):
            cells.append({"method": method, "rank": rank, "lr": lr, "seed": seed, **dict(zip(used, params))})
    return cells


def cell_name(cell: dict) -> str:
    """A folder name that says what the cell is: ``loran-r4-lr0.002-s0`` (and ``-a0.5-w3`` for its parameters)."""
    params = ("sinter_amplitude", "sinter_frequency", "sine_frequency")
    extra = "".join(f"-{SHORT_NAMES[k]}{cell[k]:g}" for k in params if k in cell)
    return f"{cell['method'].replace(':', '-')}-r{cell['rank']}-lr{cell['lr']:g}-s{cell['seed']}{extra}"


def _fixed_settings(settings, task, model_path: str) -> dict:
    """What every cell shares; a sweep resumes only into a directory made with the same."""
    shared = {f.name: getattr(settings, f.name) for f in fields(settings)
              if f.name not in GRID_OPTIONS + ("quiet", "command")}
    return json.loads(json.dumps({"task": task.source, "model": model_path, "settings": shared}, default=str))


def cmd_compare(args: argparse.Namespace) -> int:
    """Train every cell of the grid (each in its own process), keeping each finished cell on disk so that running
    the same command again resumes; then write metrics.json, table.md and the plots. Every file written is listed
    in the folder's manifest, so ``--overwrite`` removes only those."""
    import time

    from peft_loran._atomic import (DirectoryInUseError, add_to_manifest, directory_lock, relative_files,
                                    write_text_atomic)

    from . import report
    from .evaluation import main_metric
    from .files import input_paths
    from .models import resolve_model
    from .targets import check_adapter_plan
    from .training import InterruptedAfterRun, train_isolated

    settings = settings_from(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    task = args.task_data
    check_adapter_plan(settings.model, None, methods, _checked_values(args, "rank") or [settings.rank], settings, task)
    model_path = resolve_model(settings.model, quiet=settings.quiet)
    metric = main_metric(task.kind)
    cells = sweep_cells(args, settings, methods)
    out = Path(args.output_dir)
    fixed = _fixed_settings(settings, task, model_path)
    invocation = time.strftime("%Y-%m-%dT%H:%M:%S") + f" pid {os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with directory_lock(out.resolve()):
            done = _prepare_sweep_dir(out, fixed, args.overwrite, input_paths(args))
            results = []
            for number, cell in enumerate(cells, 1):
                name = cell_name(cell)
                key = json.dumps(cell, sort_keys=True)
                if key in done:
                    results.append(done[key])
                    continue
                run_settings = dataclasses.replace(settings, **{k: v for k, v in cell.items() if k != "method"})
                run_settings.check()
                if not settings.quiet:
                    budget = f"{settings.epochs:g} epochs" if settings.epochs else f"{settings.steps} steps"
                    print(f"== [{number}/{len(cells)}] {name}: {budget} on {task.name} ({len(task.train)} train "
                          "examples)", file=sys.stderr, flush=True)
                staging = f"adapters/.{name}.partial"
                _remove_owned_below(out, staging)
                add_to_manifest(out, staging=[staging])
                interrupted = None
                try:
                    result = train_isolated(cell["method"], task, run_settings, model_path, out / staging).as_dict()
                except InterruptedAfterRun as stop:  # Ctrl-C after its training: keep this cell, then stop
                    result, interrupted = stop.result.as_dict(), stop
                _remove_owned_below(out, f"adapters/{name}")  # a leftover of an interrupted run
                os.replace(out / staging, out / "adapters" / name)
                add_to_manifest(out, files=[f"adapters/{name}/{f}" for f in relative_files(out / "adapters" / name)],
                                drop_staging=[staging])
                result.update(cell, cell=name, adapter=f"adapters/{name}", eval_split=settings.eval_split,
                              invocation=invocation)
                write_text_atomic(out / "cells" / f"{name}.json", json.dumps(result, indent=2, default=str) + "\n")
                add_to_manifest(out, files=[f"cells/{name}.json"])
                results.append(result)
                if interrupted:
                    raise KeyboardInterrupt from None
            written = report.write_sweep_reports(out, results, metric, {
                "task": task.name, "task_kind": task.kind, "labels": task.labels, "metric": metric,
                "model": model_path, "eval_split": settings.eval_split,
                "settings": {f.name: getattr(settings, f.name) for f in fields(settings) if f.name not in GRID_OPTIONS},
                "grid": {name: sorted({c[name] for c in cells if name in c}) for name in GRID_OPTIONS},
                "methods": methods, "warnings": task.warnings})
            add_to_manifest(out, files=written)
    except DirectoryInUseError as exc:
        raise UserError(f"{exc}; wait for it to finish or choose another --output-dir") from None
    print(report.read_table(out))
    plots = [name for name in written if name.endswith(".png")]
    print(f"\nwrote {args.output_dir}/metrics.json, table.md, {', '.join(plots) or 'no plot'} and adapters/")
    return 0


def _remove_owned_below(out: Path, below: str) -> None:
    """Remove what this program wrote at ``out/below`` (a cell's adapter or staging folder left by an interrupted
    run); a file there it did not write is an error that names it, and stays."""
    from peft_loran._atomic import remove_owned

    if not (out / below).exists():
        return
    left = remove_owned(out, below)
    if left:
        raise UserError(f"{out / left[0]} was not written by peft-loran, and the run needs its place; move it away "
                        "(nothing was removed)")


def _prepare_sweep_dir(out: Path, fixed: dict, overwrite: bool, inputs: list[str]) -> dict:
    """Create the sweep directory, or resume one made with the same shared settings: returns its finished cells
    (keyed by their grid settings). ``--overwrite`` starts afresh, removing only the files peft-loran wrote there
    (and refusing a folder that holds others)."""
    from peft_loran._atomic import (UnsafeOverwriteError, check_replaceable, read_manifest, remove_owned,
                                    write_manifest, write_text_atomic)

    state = out / SWEEP_STATE
    if out.exists() and overwrite:
        try:
            check_replaceable(out, inputs)
        except UnsafeOverwriteError as exc:
            raise UserError(str(exc)) from None
        remove_owned(out)
        print(f"note: --overwrite: removed the previous results in {out}", file=sys.stderr)
    if out.exists():
        if not state.exists():
            raise UserError(f"output directory {out} exists; pass --overwrite to replace it")
        before = json.loads(state.read_text())
        if before != fixed:
            differ = sorted(k for k in set(before["settings"]) | set(fixed["settings"])
                            if before["settings"].get(k) != fixed["settings"].get(k))
            differ += [k for k in ("task", "model") if before[k] != fixed[k]]
            raise UserError(f"{out} holds a comparison with other settings ({', '.join(differ)}); run the same command "
                            "to resume it, or pass --overwrite / choose another --output-dir")
    else:
        out.mkdir(parents=True)
        write_text_atomic(state, json.dumps(fixed, indent=2) + "\n")
        write_manifest(out, [SWEEP_STATE])
    (out / "cells").mkdir(exist_ok=True)
    (out / "adapters").mkdir(exist_ok=True)
    listed = set((read_manifest(out) or {}).get("files", []))
    done = {}
    for path in sorted((out / "cells").glob("*.json")):
        if path.relative_to(out).as_posix() not in listed:  # only the cells this program wrote
            continue
        result = json.loads(path.read_text())
        done[json.dumps({k: result[k] for k in ("method",) + GRID_OPTIONS if k in result}, sort_keys=True)] = result
    if done:  # also with --quiet: the user should know that these results were not recomputed
        print(f"resuming: {len(done)} finished cell(s) in {out} are kept", file=sys.stderr)
    return done


def cmd_train(args: argparse.Namespace) -> int:
    from .evaluation import main_metric
    from .files import input_paths
    from .models import resolve_model
    from .targets import check_adapter_plan
    from .training import train

    settings = settings_from(args)
    task = args.task_data
    check_adapter_plan(settings.model, None, [args.method], [settings.rank], settings, task)
    model_path = resolve_model(settings.model, quiet=settings.quiet)
    with staged_output(args.output_dir, args.overwrite, input_paths(args)) as out:
        result = train(args.method, task, settings, model_path, out / "adapter").as_dict()
        _write_json(out / "metrics.json", {"task": task.name, "task_kind": task.kind, "labels": task.labels,
                                           "model": model_path, **result})
    metric = main_metric(task.kind)
    print(f"{args.method}: {metric} {result['metrics'][metric]:.4f}; adapter saved to {args.output_dir}/adapter")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .models import resolve_model
    from .evaluation import evaluate, main_metric, split_name
    from .loading import cap_max_length, load_base
    from .training import Settings

    config = adapter_config(args.adapter)
    record, task = args.task_record, args.task_data
    recorded_base = (record or {}).get("base_model") or config.base_model_name_or_path
    model_spec = args.model or recorded_base
    if not model_spec:
        raise UserError("the adapter does not record its base model; pass --model")
    model_path = resolve_model(model_spec, quiet=args.quiet)
    if args.model and record and Path(model_path).resolve() != Path(record["base_model"]).resolve():
        raise UserError(f"the adapter was trained on {record['base_model']}, not {model_path}; evaluating it on "
                        "another base model gives numbers that mean nothing (leave out --model)")
    max_length = args.max_length or (record or {}).get("max_length") or 128
    same_data = not (args.task or args.eval_file)  # the run's own data: score the examples the run scored
    eval_limit = args.eval_limit or ((record or {}).get("eval_limit") if same_data and not task.scored_split else None)
    eval_split = (record or {}).get("eval_split", "test") if same_data else "test"
    settings = Settings(eval_limit=eval_limit, eval_split=eval_split, max_length=max_length, quiet=args.quiet)
    if args.eval_limit and task.scored_split:
        task.test = task.test[: args.eval_limit]
    base, tokenizer = load_base(model_path, task, settings)
    model = attach_adapter(base, args.adapter)
    cap_max_length(settings, model)
    metrics = evaluate(model, tokenizer, task, settings, train_label_counts=(record or {}).get("train_label_counts"))
    metric = main_metric(task.kind)
    print(json.dumps({k: v for k, v in metrics.items() if k != "samples"}))
    print(f"{metric}: {metrics[metric]:.4f} on {metrics['n']} {split_name(task, settings)} examples of {task.name}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .report import inspect_adapter

    adapter = Path(args.adapter).resolve()
    output = Path(args.output) if args.output else adapter.parent / f"{adapter.name}-spectrum.png"
    summary = inspect_adapter(args.adapter, output, quiet=args.quiet)
    print(f"adapter {args.adapter}: {summary['peft_type']}, {summary['parameters']:,} parameters, "
          f"{len(summary['layers'])} adapted modules")
    for layer in summary["layers"]:
        share, beyond = layer["nonlinear_share"], layer["nonlinear_beyond_scale"]
        print(f"  {layer['layer']}: update {layer['shape'][0]}x{layer['shape'][1]}, numerical rank "
              f"{layer['numerical_rank']} of {min(layer['shape'])} (singular values above 1e-6 of the largest; the "
              f"factors have rank r = {layer['r']}), effective rank "
              f"{layer['effective_rank']:.1f}, energy beyond r {layer['energy_beyond_r']:.2e}, non-linear share "
              + ("n/a" if share is None else f"{share:.2e} ({beyond:.2e} beyond a change of scale)"))
    shares = [layer["nonlinear_share"] for layer in summary["layers"] if layer["nonlinear_share"] is not None]
    beyond = [layer["nonlinear_beyond_scale"] for layer in summary["layers"] if layer["nonlinear_share"] is not None]
    if shares:
        print(f"non-linear share of the update's energy, ||s f(BA) - s BA||^2 / ||s f(BA)||^2: at most {max(shares):.2e};"
              f" beyond the best multiple of BA (what a rescaled LoRA could not give): at most {max(beyond):.2e}"
              + (" (below 1e-6: this adapter computes what a LoRA adapter would)" if max(beyond) < 1e-6 else ""))
    print(f"spectrum plot: {summary['plot']}")
    return 0


SAMPLE_TEXTS = [
    "The committee published its report on the future of public transport on Monday.",
    "Shares in the company rose sharply after it announced record profits.",
    "Summarise: the match ended in a draw after a late goal in extra time.",
]


def _sample_inputs(model, tokenizer) -> dict:
    """Inputs for export's LoRAN-vs-LoRA comparison: the sample texts, or (a base saved without a tokenizer) the same
    number of seeded random token sequences."""
    import torch

    if tokenizer is not None:
        return dict(tokenizer(SAMPLE_TEXTS, return_tensors="pt", padding=True, truncation=True, max_length=32))
    vocab = model.get_input_embeddings().num_embeddings
    return {"input_ids": torch.randint(0, vocab, (len(SAMPLE_TEXTS), 16), generator=torch.Generator().manual_seed(0))}


#: How to load an exported classifier with its own label names, with plain transformers and PEFT (no peft_loran).
LOAD_CLASSIFIER = """import json
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

labels = json.load(open("{folder}/peft_loran_task.json"))  # id2label / label2id, in the order of the outputs
base = AutoModelForSequenceClassification.from_pretrained("{base}", id2label={{int(i): n for i, n in labels["id2label"].items()}}, label2id=labels["label2id"])
model = PeftModel.from_pretrained(base, "{folder}")"""


def _classifier_note(record: Optional[dict], folder: str = "this_folder") -> str:
    """The model card's section on loading a classifier export with its class names (empty for other tasks)."""
    if not record or record.get("kind") != "classify":
        return ""
    code = LOAD_CLASSIFIER.format(folder=folder, base=record["base_model"])
    return (f"\n## Loading the classifier with its class names ({', '.join(record['labels'])})\n\n"
            "The base model's config has no class names; `peft_loran_task.json` in this folder has them:\n\n"
            f"```python\n{code}\n```\n")


def cmd_export(args: argparse.Namespace) -> int:
    from peft_loran.export import export_lora, export_merged

    from .data import TASK_RECORD, read_task_record

    # --to-lora and --output-dir were checked before torch (options.early_problem); the LoRA factors depend on the
    # adapter alone, the base (unquantized) only serves the sample comparison
    model, tokenizer = load_adapter_model(args.adapter, args.model, args.load_in_4bit, args.quiet)
    if args.to_lora is not None:
        record = read_task_record(args.adapter)
        with _export_errors():
            report = export_lora(model, args.output_dir, args.to_lora, sample_inputs=_sample_inputs(model, tokenizer),
                                 overwrite=args.overwrite, tokenizer=tokenizer, card_note=_classifier_note(record),
                                 extra_files={TASK_RECORD: json.dumps(record, indent=2) + "\n"} if record else None)
        worst = max(report["modules"], key=lambda m: m["relative_error"])
        ranks = sorted(m["rank"] for m in report["modules"])
        rank_text = (f"rank {ranks[0]}" if ranks[0] == ranks[-1] else
                     f"ranks {ranks[0]} to {ranks[-1]}, median {ranks[len(ranks) // 2]}")
        sample = report["sample_outputs"]
        print(f"exported {len(report['modules'])} adapted modules as LoRA ({rank_text}) to {args.output_dir}")
        print(f"largest relative error of a module's update: {worst['relative_error']:.3e} ({worst['module']}); "
              f"energy kept >= {min(m['energy_kept'] for m in report['modules']):.9f}")
        print(f"on {len(SAMPLE_TEXTS)} sample texts: max |LoRAN - LoRA| output difference "
              f"{sample['max_abs_difference']:.3e} = {sample['relative_to_adapter_effect']:.3e} of the adapter's effect "
              f"(max {sample['max_abs_adapter_effect']:.3e}); per module: {args.output_dir}/export_report.json")
        return 0
    with _export_errors():
        note = export_merged(model, args.output_dir, tokenizer=tokenizer, overwrite=args.overwrite)
    how = ("4-bit base dequantized, update added in float32, saved in bfloat16" if note["quantized_base"]
           else f"saved in {note['saved_dtype']}")
    print(f"wrote the merged model to {args.output_dir} ({how}); load it with transformers' from_pretrained, no PEFT")
    return 0


@contextmanager
def _export_errors() -> Iterator[None]:
    from peft_loran._atomic import DirectoryInUseError

    try:
        yield
    except (FileExistsError, DirectoryInUseError, ValueError) as exc:  # UnsafeOverwriteError is a ValueError
        raise UserError(str(exc).splitlines()[0]) from None


def load_adapter_model(adapter: str, model_spec: Optional[str], load_in_4bit: bool, quiet: bool):
    """A LoRAN adapter on its base model (causal LM, or sequence classification when the adapter says so), and the
    tokenizer saved with it (else the base's). Refuses adapters that are not LoRAN with one ``error:`` line."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import peft_loran

    from .data import read_task_record
    from .loading import qlora_quantization

    config = adapter_config(adapter)
    if not isinstance(config, peft_loran.LoranConfig):
        raise UserError(f"{adapter} is a {getattr(config.peft_type, 'value', config.peft_type)} adapter, not LoRAN: "
                        "it needs no export (serve it as it is)")
    spec = model_spec or config.base_model_name_or_path
    if not spec:
        raise UserError("the adapter does not record its base model; pass --model")
    from .models import resolve_model

    path = resolve_model(spec, quiet=quiet)
    kwargs: dict = {"quantization_config": qlora_quantization()} if load_in_4bit else {}
    task = str(getattr(config.task_type, "value", config.task_type) or "")
    if task == "SEQ_CLS":
        labels = (read_task_record(adapter) or {}).get("labels")  # the class names, so a merged model keeps them
        names = dict(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}) if labels else {}
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=_saved_num_labels(adapter),
                                                                  **names, **kwargs)
    else:
        base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = _tokenizer_if_any(adapter) or _tokenizer_if_any(path)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return attach_adapter(base, adapter), tokenizer


def _tokenizer_if_any(path: str):
    """The tokenizer saved in ``path``, or None: a model built from a config and saved without one is common, and
    exporting needs none (it is copied along when there is one)."""
    from transformers import AutoTokenizer

    if not any((Path(path) / name).exists() for name in ("tokenizer_config.json", "tokenizer.json", "vocab.txt",
                                                           "tokenizer.model", "vocab.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def adapter_config(adapter: str):
    """The adapter's PEFT config (ours, LoRA, the original's MLORA), or one ``error:`` line."""
    from peft import PeftConfig

    import peft_loran  # noqa: F401  (registers LORAN and MLORA)

    if not (Path(adapter) / "adapter_config.json").exists():
        raise UserError(f"{adapter} is not an adapter directory (no adapter_config.json)")
    try:
        return PeftConfig.from_pretrained(adapter)
    except ValueError as exc:
        raise UserError(str(exc).splitlines()[0]) from None


def attach_adapter(base, adapter: str):
    """``PeftModel.from_pretrained`` in eval mode; a checkpoint that does not fit is one ``error:`` line."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, adapter).eval()
    except ValueError as exc:
        raise UserError(str(exc).splitlines()[0]) from None


def _saved_num_labels(adapter: str) -> int:
    """Classes of a classification adapter: the rows of its saved head (its modules_to_save)."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter) / "adapter_model.safetensors"), "pt") as fh:
        heads = [fh.get_slice(k).get_shape()[0] for k in fh.keys()
                 if ("classifier" in k or "score" in k) and k.endswith("weight") and ".loran_" not in k]
    if not heads:
        raise UserError(f"{adapter} is a classification adapter without a saved head; cannot tell its classes")
    return heads[-1]


COMMANDS = {"compare": cmd_compare, "train": cmd_train, "evaluate": cmd_evaluate, "export": cmd_export,
            "inspect": cmd_inspect}


def run(args: argparse.Namespace) -> None:
    """Run a parsed command (``peft_loran_cli.main`` parses and checks the arguments first)."""
    from .training import quiet_libraries

    quiet_libraries(getattr(args, "quiet", False))
    try:
        code = COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        where = getattr(args, "output_dir", None)
        note = f"; nothing was written to {where}" if where else ""
        if args.command == "compare":
            note = f"; finished cells are kept in {where}: run the same command to resume"
        print(f"interrupted{note}", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
