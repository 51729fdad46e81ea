"""What a run leaves beside its adapter: the task record (``peft_loran_task.json``, what ``evaluate`` and exports read)
and the model card."""

from __future__ import annotations

import json
from pathlib import Path

from .data import TaskData, data_fingerprint
from .files import TASK_RECORD
from .methods import parse_method
from .settings import Settings

def write_task_record(adapter_dir: Path, task: TaskData, settings: Settings, model_path: str, base_loading: dict) -> None:
    """What ``evaluate`` needs to evaluate the adapter again: task kind and source, field names, label names in
    the order of the model's outputs (``id2label``/``label2id`` as in a transformers config), max length, base; the
    fingerprint of the examples the run scored (so ``evaluate`` scores exactly those, or refuses), and the training
    split's label counts (the majority baseline on other data); how the base was loaded (``base_loading``: 4-bit or
    float), so that ``evaluate``, ``inspect`` and ``export`` load it the same way."""
    from .evaluation import label_counts, scored_examples, split_name

    record = {
        "task": task.name, "kind": task.kind, "source": task.source, "labels": task.labels,
        "id2label": {str(i): label for i, label in enumerate(task.labels)},
        "label2id": {label: i for i, label in enumerate(task.labels)},
        "max_length": settings.max_length, "base_model": model_path, "base_loading": base_loading,
        # the examples the run's reported metric was computed on, so `evaluate` reproduces it by default
        "eval_split": settings.eval_split, "eval_limit": settings.eval_limit,
        "fingerprint": data_fingerprint(task, split_name(task, settings), scored_examples(task, settings)),
    }
    if task.kind == "classify":
        record["train_label_counts"] = label_counts(task.train, task.labels)
    (Path(adapter_dir) / TASK_RECORD).write_text(json.dumps(record, indent=2) + "\n")


_METHOD_TITLES = {"lora": "LoRA", "rslora": "rsLoRA", "dora": "DoRA", "hira": "HiRA", "loran": "LoRAN"}


def _model_title(model_path: str) -> str:
    """A readable name of the base model: its folder, skipping generic names such as ``model`` (the folder of a
    bundled model inside its package)."""
    parts = [p for p in Path(model_path).parts if p.lower() not in ("/", "model", "models", "weights", "snapshots")]
    return parts[-1] if parts else str(model_path)


def write_model_card(adapter_dir: Path, method: str, config, task: TaskData, settings: Settings, model_path: str,
                     metrics: dict) -> None:
    """Replace PEFT's empty template card with what this adapter is: base, method and f, rank, data, metrics and
    the command that made it."""
    kind, _ = parse_method(method)
    if kind == "hira":
        how = f"HiRA (PEFT), r = {config.r}, dropout = {config.hira_dropout}; update W0 * (B A)"
    elif kind != "loran":
        how = (f"{dict(lora='LoRA', rslora='rsLoRA', dora='DoRA')[kind]} (PEFT), r = {config.r}, "
               f"alpha = {config.lora_alpha}, dropout = {config.lora_dropout}")
    else:
        how = (f"LoRAN (peft-loran), r = {config.r}, alpha = {config.loran_alpha}, dropout = {config.loran_dropout}; "
               f"update s f(BA) with f = `{config.activation}`: {config.describe_activation()}")
    source = task.source.get("task") or task.source.get("train_file")
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if k != "samples"}
    card = f"""---
library_name: peft
base_model: {model_path}
tags: [{kind if kind != 'loran' else 'loran, peft-loran'}]
---
# {_METHOD_TITLES.get(parse_method(method)[0], method)} adapter for {_model_title(model_path)}

- **Base model:** `{model_path}`
- **Method:** {how}
- **Targets:** {', '.join(sorted(config.target_modules)) if not isinstance(config.target_modules, str) else config.target_modules}
- **Data:** {task.name} ({'classification into ' + ', '.join(task.labels) if task.kind == 'classify' else 'generation'}; source `{source}`), {len(task.train)} training examples, {settings.steps if not settings.epochs else str(settings.epochs) + ' epochs'} steps of batch {settings.batch_size}, lr {settings.lr}, seed {settings.seed}, max length {settings.max_length}
- **{settings.eval_split.capitalize()} metrics** ({metrics.get('n', len(task.test))} examples): `{json.dumps(shown)}`
- **Made with:** `{settings.command or 'peft-loran'}`

Load it with `import peft_loran` (LoRAN) and `PeftModel.from_pretrained(base, this_folder)`; `peft-loran evaluate
this_folder` evaluates it again on the same data (`peft_loran_task.json` records the task and labels).
"""
    (Path(adapter_dir) / "README.md").write_text(card)
