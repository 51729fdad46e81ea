"""Training and evaluation for the command line, on transformers' Trainer.

Every method in a comparison gets the same model, data order (Trainer's seeded sampler), seed, rank, alpha,
dropout, targets, step budget and learning rate; only the adapter type differs.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .data import TASK_RECORD, Example, TaskData
from .errors import UserError
from .models import default_targets


#: In a training process started by :func:`train_isolated`: set once training is done (evaluating and saving left).
_TRAINED = None


def quiet_child(quiet: bool, trained=None) -> None:
    """Initializer of the processes that train one run each (before they import peft_loran, PEFT or bitsandbytes):
    the same quiet as the command; Ctrl-C is the command's to handle (the process would print a traceback of its
    own); and the process ends when the command that started it is killed (otherwise it would train on, orphaned)."""
    global _TRAINED
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _TRAINED = trained
    _exit_with_parent()
    quiet_libraries(quiet)


def _exit_with_parent() -> None:
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(143)  # the parent is gone: nobody will read this run's result

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def quiet_libraries(quiet: bool = False) -> None:
    """Keep the command line's log concise (library notices: :func:`peft_loran_cli.quiet_library_notices`;
    deprecation warnings meant for library developers); ``--quiet``: the result only, no progress bars."""
    import warnings

    from . import quiet_library_notices

    quiet_library_notices()
    # deprecation notices inside transformers/PEFT/torch are for their developers, not for users of this program
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if quiet:  # --quiet: the result only (no load/save progress bars, no library warnings)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("always", message="peft-loran:")  # our own (a kernel that failed to compile) stay



@dataclass
class Settings:
    """One training run's knobs (shared by all methods of a comparison)."""

    model: str = "minilm"
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: Optional[list[str]] = None
    steps: int = 60
    epochs: Optional[float] = None  # when given, train this many passes over the data instead of `steps`
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 128
    lr: float = 1e-3
    seed: int = 0
    eval_limit: Optional[int] = None
    gen_tokens: int = 24
    sinter_amplitude: float = 5e-5
    sinter_frequency: float = 1e4
    sine_frequency: float = 200.0
    eval_split: str = "test"  # "validation" to choose settings (learning rate, rank) without touching the test split
    load_in_4bit: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    quiet: bool = False
    command: str = ""  # the command line that started the run, for the model card

    def check(self) -> None:
        from .options import number_problem

        for name, value in asdict(self).items():
            problem = number_problem(name, value)
            if problem:
                raise UserError(problem)
        if self.eval_split not in ("test", "validation"):
            raise UserError(f"--eval-split must be test or validation, got {self.eval_split}")


@dataclass
class RunResult:
    method: str
    metrics: dict
    trainable_params: int
    train_seconds: float
    peak_memory_mb: float
    memory_kind: str
    loss_curve: list = field(default_factory=list)
    #: per adapted module: non-linear share of the update's energy, effective rank (peft_loran.diagnostics)
    update_statistics: list = field(default_factory=list)
    nonlinear_share: Optional[float] = None  # the largest over modules
    nonlinear_beyond_scale: Optional[float] = None  # the same, beyond the best multiple of B A (the largest)
    effective_rank: Optional[float] = None  # the mean over modules

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------- methods
#: The methods ``compare`` and ``train`` know: PEFT's LoRA family as users would pick them, and ours.
METHODS = {
    "lora": "PEFT LoRA: s B A",
    "rslora": "PEFT LoRA with rank-stabilised scaling alpha / sqrt(r)",
    "dora": "PEFT DoRA: LoRA with a learned per-row magnitude",
    "hira": "PEFT HiRA: W0 * (B A), element-wise (high rank, linear in B A)",
    "loran": "LoRAN: s f(B A), f = Sinter x + a x sin(w x) (--sinter-amplitude, --sinter-frequency)",
    "sine": "Sine-LoRA: s sin(w B A) / sqrt(in_features) (--sine-frequency); the same as loran:sine",
}


def parse_method(method: str) -> tuple[str, Optional[str]]:
    """``(kind, activation)``: kind is a PEFT method (lora, rslora, dora, hira) or ``loran``; ``sine`` is
    ``loran:sine``; ``loran:<activation>`` picks any registered activation."""
    kind, _, activation = method.partition(":")
    if kind == "sine" and not activation:
        return "loran", "sine"
    if kind not in METHODS or kind == "sine" or (kind != "loran" and activation):
        raise UserError(f"unknown method '{method}'; use {', '.join(METHODS)} or loran:<activation> (e.g. loran:tanh)")
    if activation:
        from peft_loran.activations import canonical_name

        try:
            activation = canonical_name(activation)
        except ValueError as exc:
            raise UserError(str(exc).splitlines()[0]) from None
    return kind, activation or None


def peft_config(method: str, settings: Settings, task_kind: str, model_type: str):
    from peft import LoraConfig, TaskType

    from peft_loran import LoranConfig

    kind, activation = parse_method(method)
    targets = settings.targets or default_targets(model_type)
    task_type = TaskType.SEQ_CLS if task_kind == "classify" else TaskType.CAUSAL_LM
    if kind in ("lora", "rslora", "dora"):
        return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                          target_modules=targets, task_type=task_type, use_rslora=kind == "rslora",
                          use_dora=kind == "dora")
    if kind == "hira":
        try:
            from peft import HiraConfig
        except ImportError:
            raise UserError("method hira needs PEFT >= 0.20 (pip install -U peft)") from None
        return HiraConfig(r=settings.rank, hira_dropout=settings.dropout, target_modules=targets,
                          task_type=task_type)
    return LoranConfig(r=settings.rank, loran_alpha=settings.alpha, loran_dropout=settings.dropout,
                       target_modules=targets, task_type=task_type, activation=activation or "sinter",
                       sinter_amplitude=settings.sinter_amplitude, sinter_frequency=settings.sinter_frequency,
                       sine_frequency=settings.sine_frequency)


# ----------------------------------------------------------------------------------------------------- models
def load_base(model_path: str, task: TaskData, settings: Settings):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import peft_loran  # noqa: F401  (registers LoRAN)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict = {"quantization_config": qlora_quantization()} if settings.load_in_4bit else {}
    if task.kind == "classify":
        labels = task.labels
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, **kwargs)
    else:
        if "Bert" in (getattr(_config(model_path), "architectures", None) or [""])[0]:
            raise UserError(f"task '{task.name}' generates text and needs a causal LM; {model_path} is an encoder "
                            "(use --model smollm2)")
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
        tokenizer.padding_side = "left"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if settings.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    return model, tokenizer


def cap_max_length(settings: "Settings", model) -> None:
    """Texts longer than the model's position table cannot be encoded: cap ``max_length`` there, and say so once."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and settings.max_length > limit:
        print(f"note: --max-length {settings.max_length} is more than the model's {limit} positions; using {limit}",
              file=sys.stderr, flush=True)
        settings.max_length = limit


def qlora_quantization():
    """The paper's QLoRA base: nf4 with double quantization, bf16 compute."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _config(model_path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path)


# ------------------------------------------------------------------------------------------------------- data
PROMPT = "Article: {text}\nHeadline:"


class Encoded(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example], tokenizer, kind: str, max_length: int):
        self.items = [encode(e, tokenizer, kind, max_length) for e in examples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def encode(example: Example, tokenizer, kind: str, max_length: int) -> dict:
    if kind == "classify":
        enc = tokenizer(example.text, truncation=True, max_length=max_length)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": example.label}
    target = tokenizer(" " + example.target, add_special_tokens=False)["input_ids"][: max_length // 4]
    target = target + [tokenizer.eos_token_id]
    prompt_ids = tokenizer(prompt_text(example, tokenizer, max_length - len(target)),
                           add_special_tokens=False)["input_ids"][-(max_length - len(target)):]
    ids = prompt_ids + target
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt_ids) + target}


def prompt_text(example: Example, tokenizer, budget: int) -> str:
    """The prompt with the article cut to fit ``budget`` tokens (cut in words, then re-checked)."""
    words = example.text.split()
    text = " ".join(words[: max(8, budget)])
    while len(tokenizer(PROMPT.format(text=text), add_special_tokens=False)["input_ids"]) > budget and len(
            text.split()) > 8:
        text = " ".join(text.split()[: int(len(text.split()) * 0.8)])
    return PROMPT.format(text=text)


def collate(tokenizer):
    def fn(batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        pad = tokenizer.pad_token_id
        left = tokenizer.padding_side == "left"

        def padded(seq, value):
            fill = [value] * (width - len(seq))
            return fill + seq if left else seq + fill

        out = {"input_ids": torch.tensor([padded(b["input_ids"], pad) for b in batch]),
               "attention_mask": torch.tensor([padded(b["attention_mask"], 0) for b in batch])}
        if isinstance(batch[0]["labels"], list):
            out["labels"] = torch.tensor([padded(b["labels"], -100) for b in batch])
        else:
            out["labels"] = torch.tensor([b["labels"] for b in batch])
        return out

    return fn


# ----------------------------------------------------------------------------------------------------- memory
def _on_cuda(device: Optional[str]) -> bool:
    return torch.cuda.is_available() if device is None else device == "cuda"


def reset_peak_memory(device: Optional[str] = None) -> float:
    """Reset the peak-memory counter (CUDA allocations, else the process's peak RSS where the OS allows);
    returns the current level in MB. ``device`` None: CUDA when available, as the Trainer does."""
    if _on_cuda(device):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as fh:
            rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return rss
    except OSError:
        return 0.0


def peak_memory(device: Optional[str] = None) -> tuple[float, str]:
    """(peak in MB since :func:`reset_peak_memory`, what was measured)."""
    if _on_cuda(device):
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024, "peak RSS"
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


# ---------------------------------------------------------------------------------------------------- training
def train(method: str, task: TaskData, settings: Settings, model_path: str, save_to: Optional[Path]) -> RunResult:
    """Fine-tune one method on ``task.train`` and evaluate on ``task.test``; save the adapter to ``save_to``."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(settings.seed)
    model, tokenizer = load_base(model_path, task, settings)
    cap_max_length(settings, model)
    config = peft_config(method, settings, task.kind, model.config.model_type)
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"{method}: {str(exc).splitlines()[0]}") from None
    paired_init(model, settings.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_set = Encoded(task.train, tokenizer, task.kind, settings.max_length)
    with tempfile.TemporaryDirectory(prefix="peft-loran-trainer-") as scratch:  # we save adapters ourselves
        budget = (dict(num_train_epochs=settings.epochs, max_steps=-1) if settings.epochs
                  else dict(max_steps=settings.steps))
        steps = settings.steps if not settings.epochs else max(1, int(
            settings.epochs * len(train_set) / (settings.batch_size * settings.grad_accum)))
        args = TrainingArguments(
            output_dir=scratch, **budget, per_device_train_batch_size=settings.batch_size,
            gradient_accumulation_steps=settings.grad_accum, learning_rate=settings.lr, seed=settings.seed,
            data_seed=settings.seed, logging_steps=logging_interval(steps), save_strategy="no", report_to=[],
            disable_tqdm=settings.quiet, bf16=settings.bf16, lr_scheduler_type="linear", warmup_steps=0,
            use_cpu=not torch.cuda.is_available(),  # else bf16 on a CPU-only machine is refused with a traceback
            gradient_checkpointing=settings.gradient_checkpointing, remove_unused_columns=False,
            dataloader_num_workers=0, log_level="error",
            dataloader_pin_memory=torch.cuda.is_available(),  # pinning is for GPU transfers; on CPU it only warns
        )
        trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collate(tokenizer))
        _keep_progress_bar_only(trainer, settings.quiet)
        before = reset_peak_memory()
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        peak, kind = peak_memory()
    if _TRAINED is not None:  # tell the command (train_isolated) that only evaluating and saving are left
        _TRAINED.set()
    curve = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    model.eval()
    metrics = evaluate(model, tokenizer, task, settings)
    from peft_loran.diagnostics import summarize, update_statistics

    stats = update_statistics(model)
    summary = summarize(stats)
    if save_to is not None:
        model.save_pretrained(save_to)
        tokenizer.save_pretrained(save_to)
        write_task_record(save_to, task, settings, model_path)
        write_model_card(save_to, method, config, task, settings, model_path, metrics)
    return RunResult(method, metrics, trainable, seconds, peak - before, kind, curve, stats,
                     summary["nonlinear_share"], summary["nonlinear_beyond_scale"], summary["effective_rank_mean"])


def paired_init(model, seed: int) -> None:
    """Draw every adapted module's ``A`` from a generator seeded by ``seed`` and the module's name, with LoRA's
    initialisation (Kaiming uniform, a = sqrt(5)). PEFT's LoRA draws more random numbers while building its layers
    than LoRAN does, so the same global seed alone gives them different ``A``; with this, every method of a
    comparison cell starts from the same ``A`` (and ``B = 0``), and the Trainer, which re-seeds when it is built,
    gives them the same data order and dropout masks: a paired difference then isolates the method."""
    import hashlib

    for name, module in model.named_modules():
        for attribute in ("lora_A", "loran_A", "hira_A"):
            factors = getattr(module, attribute, None)
            if not isinstance(factors, torch.nn.ModuleDict | torch.nn.ParameterDict) or "default" not in factors:
                continue
            A = factors["default"]
            A = A.weight if isinstance(A, torch.nn.Linear) else A
            digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            bound = 1.0 / math.sqrt(A.shape[1])  # kaiming_uniform_(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
            with torch.no_grad():
                A.copy_(torch.empty(A.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator))


def logging_interval(steps: int) -> int:
    """About 30 points on the loss curve, at an interval that divides ``steps`` so the last step is logged too."""
    target = max(1, steps // 30)
    return max(d for d in range(1, target + 1) if steps % d == 0)




def write_task_record(adapter_dir: Path, task: TaskData, settings: Settings, model_path: str) -> None:
    """What ``evaluate`` needs to evaluate the adapter again: task kind and source, field names, label names in
    the order of the model's outputs (``id2label``/``label2id`` as in a transformers config), max length, base."""
    record = {
        "task": task.name, "kind": task.kind, "source": task.source, "labels": task.labels,
        "id2label": {str(i): label for i, label in enumerate(task.labels)},
        "label2id": {label: i for i, label in enumerate(task.labels)},
        "max_length": settings.max_length, "base_model": model_path,
        # the examples the run's reported metric was computed on, so `evaluate` reproduces it by default
        "eval_split": settings.eval_split, "eval_limit": settings.eval_limit,
    }
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
    from .report import activation_formula

    kind, _ = parse_method(method)
    if kind == "hira":
        how = f"HiRA (PEFT), r = {config.r}, dropout = {config.hira_dropout}; update W0 * (B A)"
    elif kind != "loran":
        how = (f"{dict(lora='LoRA', rslora='rsLoRA', dora='DoRA')[kind]} (PEFT), r = {config.r}, "
               f"alpha = {config.lora_alpha}, dropout = {config.lora_dropout}")
    else:
        how = (f"LoRAN (peft-loran), r = {config.r}, alpha = {config.loran_alpha}, dropout = {config.loran_dropout}; "
               f"update s f(BA) with f = `{config.activation}`: {activation_formula(config)}")
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


class InterruptedAfterRun(KeyboardInterrupt):
    """Ctrl-C came after the run in progress had finished training; its result (evaluated and saved) is kept."""

    def __init__(self, result: "RunResult") -> None:
        super().__init__()
        self.result = result


def train_isolated(method: str, task: TaskData, settings: Settings, model_path: str,
                   save_to: Optional[Path]) -> RunResult:
    """:func:`train` in a fresh process, so every method of a comparison starts from the same memory state and
    its peak memory is its own. Errors come back as usual. Ctrl-C stops the run at once, unless it has finished
    training: then it is evaluated and saved first and comes back as :class:`InterruptedAfterRun` (a second Ctrl-C
    stops it at once)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    trained = context.Event()
    pool = ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=quiet_child,
                               initargs=(settings.quiet, trained))
    future = pool.submit(train, method, task, settings, model_path, save_to)
    try:
        try:
            return future.result()
        except KeyboardInterrupt:
            if not trained.is_set():
                raise
            print("\ninterrupted: the run in progress has finished training; evaluating and saving it (Ctrl-C again "
                  "to stop now)", file=sys.stderr, flush=True)
            raise InterruptedAfterRun(future.result()) from None
    except KeyboardInterrupt:
        for process in list(getattr(pool, "_processes", {}).values()):  # stop the run now, not when it is done
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _keep_progress_bar_only(trainer, quiet: bool) -> None:
    """Trainer prints every logged dict; keep its progress bar (unless quiet) and record the losses silently."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class ProgressBarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            return None

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not quiet:
        trainer.add_callback(ProgressBarOnly)


# -------------------------------------------------------------------------------------------------- evaluation
def evaluate(model, tokenizer, task: TaskData, settings: Settings) -> dict:
    """Metrics on the test split, or on the validation split with ``settings.eval_split == "validation"`` (for
    choosing settings without looking at the test split)."""
    split = task.validation if settings.eval_split == "validation" else task.test
    examples = split[: settings.eval_limit] if settings.eval_limit else split
    if not examples:
        raise UserError(f"task '{task.name}' has an empty {settings.eval_split} split")
    progress = _progress(len(examples), "evaluating", settings.quiet)
    if task.kind == "classify":
        metrics = _evaluate_classification(model, tokenizer, examples, settings, progress)
        return {**metrics, **majority_baseline(task, examples, metrics.pop("predicted"))}
    return _evaluate_generation(model, tokenizer, examples, settings, progress)


def majority_baseline(task: TaskData, examples: list[Example], predicted: list[int]) -> dict:
    """What a constant prediction scores, so a reader can tell a model from one: the training split's most frequent
    class and its share of the evaluated examples, how many classes the model predicted at all, and a note when
    it predicted a single one."""
    from collections import Counter

    counts = Counter(e.label for e in task.train)
    majority = min(counts, key=lambda label: (-counts[label], label)) if counts else None
    rate = sum(e.label == majority for e in examples) / len(examples)
    distinct = sorted(set(predicted))
    out = {"majority_label": task.labels[majority] if majority is not None else None, "majority_rate": rate,
           "predicted_classes": len(distinct)}
    if len(distinct) == 1:
        out["note"] = f"predicts a single class ({task.labels[distinct[0]]}) for every example"
    return out


def _progress(total: int, desc: str, quiet: bool):
    """A progress bar that ends with its own line (``leave=True``): a cleared bar leaves the cursor on its line, and
    in a log or a pipe the next message would be written after it, on the same line."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, file=sys.stderr, leave=True)


@torch.no_grad()
def _evaluate_classification(model, tokenizer, examples, settings, progress) -> dict:
    predictions, golds = [], []
    batch = collate(tokenizer)
    for i in range(0, len(examples), 16):
        chunk = examples[i:i + 16]
        inputs = batch([encode(e, tokenizer, "classify", settings.max_length) for e in chunk])
        inputs.pop("labels")
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        predictions += model(**inputs).logits.argmax(-1).tolist()
        golds += [e.label for e in chunk]
        progress.update(len(chunk))
    progress.close()
    labels = sorted(set(golds) | set(predictions))
    f1s = []
    for label in labels:
        tp = sum(p == g == label for p, g in zip(predictions, golds))
        fp = sum(p == label != g for p, g in zip(predictions, golds))
        fn = sum(g == label != p for p, g in zip(predictions, golds))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    accuracy = sum(p == g for p, g in zip(predictions, golds)) / len(golds)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s), "n": len(golds), "predicted": predictions}


@torch.no_grad()
def _evaluate_generation(model, tokenizer, examples, settings, progress) -> dict:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    samples = []
    tokenizer.padding_side = "left"
    budget = settings.max_length - settings.gen_tokens
    for i in range(0, len(examples), 8):
        chunk = examples[i:i + 8]
        prompts = [prompt_text(e, tokenizer, budget) for e in chunk]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = {k: encoded[k].to(model.device) for k in ("input_ids", "attention_mask")}
        out = model.generate(**inputs, max_new_tokens=settings.gen_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for e, text in zip(chunk, texts):
            hyp = text.strip().split("\n")[0]
            scores = scorer.score(e.target, hyp)
            for key in totals:
                totals[key] += scores[key].fmeasure
            if len(samples) < 3:
                samples.append({"reference": e.target, "generated": hyp})
        progress.update(len(chunk))
    progress.close()
    n = len(examples)
    return {**{k: v / n for k, v in totals.items()}, "n": n, "samples": samples}


def main_metric(task_kind: str) -> str:
    return "accuracy" if task_kind == "classify" else "rougeL"


__all__ = ["RunResult", "Settings", "evaluate", "main_metric", "parse_method", "train", "train_isolated"]
