"""Scoring an adapter: accuracy and macro-F1 with the majority-class baseline (classification), ROUGE of greedy
generations (generation), on the split and number of examples the settings name."""

from __future__ import annotations

import sys
import torch

from .data import Example, TaskData
from .encoding import collate, encode, prompt_text
from .errors import UserError

from .settings import Settings


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
    class (the evaluated examples' own when there is no training split, as for ``evaluate --eval-file``; named in
    ``majority_from``) and its share of the evaluated examples, how many classes the model predicted at all, and a
    note when it predicted a single one."""
    from collections import Counter

    source = "training split" if task.train else "evaluated examples"
    counts = Counter(e.label for e in (task.train or examples))
    majority = min(counts, key=lambda label: (-counts[label], label)) if counts else None
    rate = sum(e.label == majority for e in examples) / len(examples)
    distinct = sorted(set(predicted))
    out = {"majority_label": task.labels[majority] if majority is not None else None, "majority_rate": rate,
           "majority_from": source, "predicted_classes": len(distinct)}
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

