"""Scoring an adapter: accuracy and macro-F1 with the majority-class baseline (classification), ROUGE of greedy
generations (generation), on the split and number of examples the settings name."""

from __future__ import annotations

import sys
from collections import Counter
from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional

import torch

from .data import Example, TaskData
from .encoding import collate, encode, prompt_text
from .errors import UserError

from .settings import Settings


def scored_examples(task: TaskData, settings: Settings) -> list[Example]:
    """The examples a run is scored on: the test split (or the validation split, ``settings.eval_split``), cut to
    ``settings.eval_limit``. A task rebuilt from a run's fingerprint holds exactly those in its test split."""
    if task.scored_split is not None:
        return task.test
    split = task.validation if settings.eval_split == "validation" else task.test
    return split[: settings.eval_limit] if settings.eval_limit else split


def split_name(task: TaskData, settings: Settings) -> str:
    return task.scored_split or settings.eval_split


def evaluate(model, tokenizer, task: TaskData, settings: Settings, train_label_counts: Optional[dict] = None,
             eval_cache: bool = True) -> dict:
    """Metrics on :func:`scored_examples`. A LoRAN model is evaluated with its eval cache on (its dense updates are
    built once, not again for every batch and generated token; freed afterwards; ``eval_cache=False`` leaves the
    model's own setting): the same numbers, at about the base model's speed. ``train_label_counts`` (label name -> count in the adapter's training split, from its task
    record) sets the majority baseline where ``task`` has no training split."""
    examples = scored_examples(task, settings)
    if not examples:
        raise UserError(f"task '{task.name}' has an empty {split_name(task, settings)} split")
    progress = _progress(len(examples), "evaluating", settings.quiet)
    with eval_cache_on(model) if eval_cache else nullcontext():
        if task.kind == "classify":
            metrics = _evaluate_classification(model, tokenizer, examples, settings, progress)
            predicted = metrics.pop("predicted")
            counts = train_label_counts or label_counts(task.train, task.labels)
            return {**metrics, **majority_baseline(task.labels, counts, examples, predicted)}
        return _evaluate_generation(model, tokenizer, examples, settings, progress)


@contextmanager
def eval_cache_on(model) -> Iterator[None]:
    """The model's LoRAN layers keep their dense update between no-grad calls while the block runs, then free it
    (no-op for other adapters). Memory: one weight-sized float32 matrix per adapted layer, while evaluating."""
    from peft_loran import set_eval_cache
    from peft_loran.layer import LoranLayer

    has_loran = any(isinstance(m, LoranLayer) for m in model.modules())
    if has_loran:
        set_eval_cache(model, True, max_mb=_free_memory_mb(model) / 2)
    try:
        yield
    finally:
        if has_loran:
            set_eval_cache(model, False)


def _free_memory_mb(model) -> float:
    """Memory free for the cache where the model lives (GPU: free device memory; else the system's available
    memory): the cache takes at most half of it, layers beyond that compute their update per call."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    try:
        with open("/proc/meminfo") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable")) / 1024
    except (OSError, StopIteration):
        return 1024.0


def label_counts(examples: list[Example], labels: list[str]) -> dict[str, int]:
    """How often each label occurs in ``examples``, by name (every label, zero counts included)."""
    counts = Counter(labels[e.label] for e in examples)
    return {label: counts.get(label, 0) for label in labels}


def majority_baseline(labels: list[str], train_counts: dict[str, int], examples: list[Example],
                      predicted: list[int]) -> dict:
    """What a constant prediction scores, so a reader can tell a model from one: the training split's most frequent
    class (``train_counts``; when there are none, the evaluated examples' own, named in ``majority_from``: an
    optimistic baseline), its share of the evaluated examples, the classes tied with it (``majority_tie``), how many
    classes the model predicted at all, and a note when it predicted a single one."""
    source = "training split"
    counts = {k: v for k, v in train_counts.items() if k in labels}
    if not any(counts.values()):
        source = "evaluated examples (no training counts recorded)"
        counts = label_counts(examples, labels)
    top = max(counts.values())
    tied = [label for label in labels if counts.get(label, 0) == top]
    majority = labels.index(tied[0])
    rate = sum(e.label == majority for e in examples) / len(examples)
    distinct = sorted(set(predicted))
    out = {"majority_label": labels[majority], "majority_rate": rate, "majority_from": source,
           "predicted_classes": len(distinct), "classes": len(labels)}
    if len(tied) > 1:
        out["majority_tie"] = tied
    if len(distinct) == 1:
        out["note"] = f"predicts a single class ({labels[distinct[0]]}) for every example"
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
            if len(samples) < SAMPLES:
                samples.append({"source": e.text, "reference": e.target, "generated": hyp})
        progress.update(len(chunk))
    progress.close()
    n = len(examples)
    return {**{k: v / n for k, v in totals.items()}, "n": n, "samples": samples}


#: Generated examples kept in the metrics and printed by train and evaluate.
SAMPLES = 3


def sample_lines(metrics: dict, width: int = 100) -> list[str]:
    """A few scored examples of a generation run as text a reader can judge: source (shortened), reference and
    generated output."""
    def short(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 3] + "..."

    lines = []
    for number, sample in enumerate(metrics.get("samples") or [], 1):
        lines += [f"example {number}:", f"  source:    {short(sample.get('source', ''))}",
                  f"  reference: {short(sample['reference'])}", f"  generated: {short(sample['generated'])}"]
    return lines


def main_metric(task_kind: str) -> str:
    return "accuracy" if task_kind == "classify" else "rougeL"


def score_details(metrics: dict) -> list[str]:
    """What a classification score needs beside it to be read (printed by ``train`` and ``evaluate`` alike):
    macro-F1, how many classes the model predicted, and what always answering the majority class scores."""
    if "macro_f1" not in metrics:
        return []
    details = [f"macro-F1 {metrics['macro_f1']:.4f}"]
    if "predicted_classes" in metrics:
        details.append(f"{metrics['predicted_classes']} of {metrics['classes']} classes predicted")
    if "majority_rate" in metrics:
        details.append(f"always '{metrics['majority_label']}': {metrics['majority_rate']:.4f}")
    return details

