"""``peft-loran compare``: a grid of runs (methods x ranks x learning rates x seeds), each in its own process, written
cell by cell into one output folder, so that running the same command again resumes it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

from .errors import UserError
from .options import GRID_OPTIONS, SHORT_NAMES, SWEEP_STATE, checked_values
from .outputs import OutputFolder


def sweep_cells(args: argparse.Namespace, settings, methods: list[str]) -> list[dict]:
    """Every cell of the grid: methods x ranks x learning rates x seeds, times the activation parameters for the
    methods that use them. A cell is a dict of its method and its grid settings."""
    from itertools import product

    from .light import library_module
    from .methods import parse_method

    parameter_fields = library_module("activations").parameter_fields()
    values = {name: checked_values(args, name) or [getattr(settings, name)] for name in GRID_OPTIONS}
    cells = []
    for seed, rank, lr, method in product(values["seed"], values["rank"], values["lr"], methods):
        kind, activation = parse_method(method)
        used = parameter_fields.get(activation or "sinter", ()) if kind == "loran" else ()
        for params in product(*(values[p] for p in used)):
            cells.append({"method": method, "rank": rank, "lr": lr, "seed": seed, **dict(zip(used, params))})
    return cells


def cell_name(cell: dict) -> str:
    """A folder name that says what the cell is: ``loran-r4-lr0.002-s0`` (and ``-a0.5-w3`` for its parameters)."""
    params = ("sinter_amplitude", "sinter_frequency", "sine_frequency")
    extra = "".join(f"-{SHORT_NAMES[k]}{cell[k]:g}" for k in params if k in cell)
    return f"{cell['method'].replace(':', '-')}-r{cell['rank']}-lr{cell['lr']:g}-s{cell['seed']}{extra}"


def _fixed_settings(settings, task, model_path: str) -> dict:
    """What every cell shares; a sweep resumes only into a folder made with the same."""
    shared = {f.name: getattr(settings, f.name) for f in fields(settings)
              if f.name not in GRID_OPTIONS + ("quiet", "command")}
    return json.loads(json.dumps({"task": task.source, "model": model_path, "settings": shared}, default=str))


def cmd_compare(args: argparse.Namespace) -> int:
    """Train every cell of the grid, keeping each finished cell on disk; then write metrics.json, table.md and the
    plots. Every file written is listed in the folder's manifest, so ``--overwrite`` removes only those."""
    from . import report
    from .settings import settings_from
    from .evaluation import main_metric
    from .files import input_paths
    from .models import resolve_model
    from .targets import check_adapter_plan

    settings = settings_from(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    task = args.task_data
    check_adapter_plan(settings.model, None, methods, checked_values(args, "rank") or [settings.rank], settings, task)
    model_path = resolve_model(settings.model, quiet=settings.quiet)
    metric = main_metric(task.kind)
    cells = sweep_cells(args, settings, methods)
    folder = OutputFolder(args.output_dir, input_paths(args))
    invocation = time.strftime("%Y-%m-%dT%H:%M:%S") + f" pid {os.getpid()}"
    with folder.locked():
        done = _prepare(folder, _fixed_settings(settings, task, model_path), args.overwrite)
        results = []
        for number, cell in enumerate(cells, 1):
            key = json.dumps(cell, sort_keys=True)
            if key in done:
                results.append(done[key])
                continue
            _announce(number, len(cells), cell, settings, task)
            results.append(_run_cell(folder, cell, settings, task, model_path, invocation))
        written = report.write_sweep_reports(folder.path, results, metric, {
            "task": task.name, "task_kind": task.kind, "labels": task.labels, "metric": metric,
            "model": model_path, "eval_split": settings.eval_split,
            "settings": {f.name: getattr(settings, f.name) for f in fields(settings) if f.name not in GRID_OPTIONS},
            "grid": {name: sorted({c[name] for c in cells if name in c}) for name in GRID_OPTIONS},
            "methods": methods, "warnings": task.warnings})
        folder.claim(files=written)
    print(report.read_table(folder.path))
    plots = [name for name in written if name.endswith(".png")]
    print(f"\nwrote {args.output_dir}/metrics.json, table.md, {', '.join(plots) or 'no plot'} and adapters/")
    return 0


def _announce(number: int, total: int, cell: dict, settings, task) -> None:
    if not settings.quiet:
        budget = f"{settings.epochs:g} epochs" if settings.epochs else f"{settings.steps} steps"
        print(f"== [{number}/{total}] {cell_name(cell)}: {budget} on {task.name} ({len(task.train)} train examples)",
              file=sys.stderr, flush=True)


def _run_cell(folder: OutputFolder, cell: dict, settings, task, model_path: str, invocation: str) -> dict:
    """Train one cell in its own process into a staging folder, then move it into place and record it; Ctrl-C after
    its training keeps the cell, then stops the comparison."""
    from .light import library_module
    from .training import InterruptedAfterRun, train_isolated

    atomic = library_module("atomic")
    name = cell_name(cell)
    run_settings = dataclasses.replace(settings, **{k: v for k, v in cell.items() if k != "method"})
    run_settings.check()
    staging = f"adapters/.{name}.partial"
    folder.make_room(staging)
    folder.claim(staging=[staging])
    interrupted = False
    try:
        result = train_isolated(cell["method"], task, run_settings, model_path, folder.path / staging).as_dict()
    except InterruptedAfterRun as stop:  # Ctrl-C after its training: keep this cell, then stop
        result, interrupted = stop.result.as_dict(), True
    folder.make_room(f"adapters/{name}")  # a leftover of an interrupted run
    os.replace(folder.path / staging, folder.path / "adapters" / name)
    folder.claim(files=[f"adapters/{name}/{f}" for f in atomic.relative_files(folder.path / "adapters" / name)],
                 done_staging=[staging])
    result.update(cell, cell=name, adapter=f"adapters/{name}", eval_split=settings.eval_split, invocation=invocation)
    atomic.write_text_atomic(folder.path / "cells" / f"{name}.json", json.dumps(result, indent=2, default=str) + "\n")
    folder.claim(files=[f"cells/{name}.json"])
    if interrupted:
        raise KeyboardInterrupt from None
    return result


def _prepare(folder: OutputFolder, fixed: dict, overwrite: bool) -> dict:
    """Create the sweep folder, or resume one made with the same shared settings: returns its finished cells (keyed
    by their grid settings). ``--overwrite`` starts afresh, removing only the files peft-loran wrote there (and
    refusing a folder that holds others)."""
    out = folder.path
    if out.exists() and overwrite:
        problem = folder.replace_problem()
        if problem:
            raise UserError(problem + " (nothing was removed)")
        folder.remove_owned()
        print(f"note: --overwrite: removed the previous results in {out}", file=sys.stderr)
    if out.exists():
        _check_same_settings(out, fixed)
    else:
        out.mkdir(parents=True)
        from .light import library_module

        library_module("atomic").write_text_atomic(out / SWEEP_STATE, json.dumps(fixed, indent=2) + "\n")
        folder.write_manifest([SWEEP_STATE])
    (out / "cells").mkdir(exist_ok=True)
    (out / "adapters").mkdir(exist_ok=True)
    listed, _ = folder.owned()
    done = {}
    for path in sorted((out / "cells").glob("*.json")):
        if path.relative_to(out).as_posix() not in listed:  # only the cells this program wrote
            continue
        result = json.loads(path.read_text())
        done[json.dumps({k: result[k] for k in ("method",) + GRID_OPTIONS if k in result}, sort_keys=True)] = result
    if done:  # also with --quiet: the user should know that these results were not recomputed
        print(f"resuming: {len(done)} finished cell(s) in {out} are kept", file=sys.stderr)
    return done


def _check_same_settings(out: Path, fixed: dict) -> None:
    state = out / SWEEP_STATE
    if not state.exists():
        raise UserError(f"output directory {out} exists; pass --overwrite to replace it")
    before = json.loads(state.read_text())
    if before != fixed:
        differ = sorted(k for k in set(before["settings"]) | set(fixed["settings"])
                        if before["settings"].get(k) != fixed["settings"].get(k))
        differ += [k for k in ("task", "model") if before[k] != fixed[k]]
        raise UserError(f"{out} holds a comparison with other settings ({', '.join(differ)}); run the same command to "
                        "resume it, or pass --overwrite / choose another --output-dir")
