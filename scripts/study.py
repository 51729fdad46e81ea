"""The study behind docs/study.md: does a non-linear low-rank update help, where, by how much, at what cost?

    .venv/bin/python scripts/study.py            # everything; resumable (finished runs are kept in runs/study/)
    .venv/bin/python scripts/study.py --only synthetic

Two tasks:

* ``synthetic``: rank is the bottleneck by construction. One frozen 128 x 128 linear layer must learn a known
  full-rank target update ``T`` from inputs ``x ~ N(0, I)`` (loss ``||x (Delta - T)^T||^2``, so the loss measures
  ``||Delta - T||_F^2``). The metric is the share of ``T``'s energy explained, ``1 - ||Delta - T||^2 / ||T||^2``; a
  linear rank-r update can explain at most the top r singular values' share (Eckart-Young), which the tables show as
  "rank-r bound". Two targets: ``powerlaw`` (random singular vectors, singular values i^-0.5: a generic full-rank
  matrix), ``sine`` (``sin(30 U V)`` with a rank-4 ``U V``, scaled to the same energy: a sine-structured target)
  and ``sine-matched`` (``(16 / 4) sin(200 U V) / sqrt(128)``: exactly what a rank-4 Sine-LoRA update with the
  study's alpha 16 and w 200 can represent, amplitude included). Runs in-process, seconds each, through PEFT as
  users use it.
* ``bbc``: the bundled BBC News topics (MiniLM, 5 classes) through ``peft-loran compare`` (one process per run).
* ``headline``: BBC headline generation with SmolLM2-135M (ROUGE-L), minutes per run: LoRA and Sine-LoRA, one seed.

Per task: a learning rate per method chosen on validation data with one seed (never the test split), then every
method at ranks x seeds with its chosen learning rate; LoRA alone over ranks 1, 4, 16, 64 first, to see whether rank
limits the task at all. Results: docs/study/results.csv (one row per run), docs/study/tables.md, docs/study/*.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "study"
DOCS = ROOT / "docs" / "study"

#: The methods of the study: (name, peft-loran compare method, extra compare options)
METHODS = {
    "lora": ("lora", []),
    "rslora": ("rslora", []),
    "loran-paper": ("loran", ["--sinter-amplitude", "5e-5", "--sinter-frequency", "1e4"]),
    "loran-strong": ("loran", ["--sinter-amplitude", "1", "--sinter-frequency", "100"]),
    "sine": ("sine", ["--sine-frequency", "200"]),
}
SEEDS = [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------- synthetic
SYN_DIM, SYN_STEPS, SYN_BATCH = 128, 1500, 256
SYN_RANKS = [1, 2, 4, 8, 16]
SYN_LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
SYN_STRONG = dict(sinter_amplitude=1.0, sinter_frequency=30.0)


def synthetic_target(kind: str):
    import torch

    g = torch.Generator().manual_seed(1234)
    d = SYN_DIM
    if kind == "powerlaw":
        U, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        sv = torch.arange(1, d + 1, dtype=torch.float64) ** -0.5
        T = U @ torch.diag(sv) @ V.T
    elif kind == "sine":  # sin(30 U V) with a rank-4 U V, scaled to the others' energy
        U = torch.randn(d, 4, generator=g, dtype=torch.float64) / 4
        V = torch.randn(4, d, generator=g, dtype=torch.float64) / 4
        T = torch.sin(30 * U @ V) / math.sqrt(d)
    else:  # sine-matched: exactly what a rank-4 Sine-LoRA update (alpha 16, w 200, g = sqrt(d)) can represent
        U = torch.randn(d, 4, generator=g, dtype=torch.float64) * 0.07
        V = torch.randn(4, d, generator=g, dtype=torch.float64) * 0.07
        return ((16 / 4) * torch.sin(200 * U @ V) / math.sqrt(d)).float()
    T = T / T.norm() * 4.0  # the same energy for both targets
    return T.float()


def synthetic_config(method: str, rank: int):
    from peft import LoraConfig

    from peft_loran import LoranConfig

    common = dict(r=rank, target_modules=["layer"])
    if method in ("lora", "rslora"):  # alpha 16 for every method, as the command line's default
        return LoraConfig(lora_alpha=16, use_rslora=method == "rslora", **common)
    if method == "loran-paper":
        return LoranConfig(loran_alpha=16, **common)
    if method == "loran-strong":
        return LoranConfig(loran_alpha=16, **SYN_STRONG, **common)
    return LoranConfig(loran_alpha=16, activation="sine", sine_frequency=200.0, **common)


def synthetic_run(target: str, method: str, rank: int, lr: float, seed: int, split: str) -> dict:
    """Train one adapter on the synthetic task; the metric is measured on the update itself (the explained share
    of the target's energy), which is what the loss on isotropic inputs estimates."""
    import torch
    from peft import get_peft_model

    import peft_loran  # noqa: F401
    from peft_loran_cli.training import paired_init
    from peft_loran.diagnostics import update_statistics

    T = synthetic_target(target)
    torch.manual_seed(0)
    base = torch.nn.Module()
    base.layer = torch.nn.Linear(SYN_DIM, SYN_DIM, bias=False)
    model = get_peft_model(base, synthetic_config(method, rank))
    paired_init(model, seed)
    layer = model.base_model.model.layer
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    data = torch.Generator().manual_seed(seed if split == "test" else 10_000 + seed)
    started = time.perf_counter()
    for _ in range(SYN_STEPS):
        x = torch.randn(SYN_BATCH, SYN_DIM, generator=data)
        with torch.no_grad():
            want = x @ (layer.get_base_layer().weight + T).T
        loss = (layer(x) - want).pow(2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        delta = layer(torch.eye(SYN_DIM)) - torch.eye(SYN_DIM) @ layer.get_base_layer().weight.T  # rows: Delta^T
        explained = 1 - float((delta.T - T).pow(2).sum() / T.pow(2).sum())
    stats = update_statistics(model)[0]
    return dict(task=f"synthetic-{target}", method=method, rank=rank, lr=lr, seed=seed, split=split,
                metric="explained_energy", value=explained, train_seconds=seconds,
                nonlinear_share=stats["nonlinear_share"], nonlinear_beyond_scale=stats["nonlinear_beyond_scale"],
                effective_rank=stats["effective_rank"], trainable_params=sum(p.numel() for p in params))


def rank_bound(target: str, rank: int) -> float:
    import torch

    sv = torch.linalg.svdvals(synthetic_target(target).double())
    return float((sv[:rank] ** 2).sum() / (sv**2).sum())


class Store:
    """Finished runs, one JSON line each in runs/study/<name>.jsonl: a rerun skips them (resumable)."""

    def __init__(self, name: str):
        RUNS.mkdir(parents=True, exist_ok=True)
        self.path = RUNS / f"{name}.jsonl"
        self.rows = [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []

    def get(self, **key):
        for row in self.rows:
            if all(row.get(k) == v for k, v in key.items()):
                return row
        return None

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def run_synthetic() -> list[dict]:
    store = Store("synthetic")
    rows = []
    for target in ("powerlaw", "sine", "sine-matched"):
        # learning rate per method: validation data (other inputs), seed 0, rank 4
        chosen = {}
        for method in METHODS:
            scores = {}
            for lr in SYN_LRS:
                key = dict(task=f"synthetic-{target}", method=method, rank=4, lr=lr, seed=0, split="validation")
                row = store.get(**key) or _add(store, synthetic_run(target, method, 4, lr, 0, "validation"))
                scores[lr] = row["value"]
            chosen[method] = max(scores, key=scores.get)
            print(f"synthetic-{target} {method}: lr {chosen[method]:g} (validation {scores})", flush=True)
        for method in METHODS:
            for rank in SYN_RANKS:
                for seed in SEEDS:
                    key = dict(task=f"synthetic-{target}", method=method, rank=rank, lr=chosen[method], seed=seed,
                               split="test")
                    rows.append(store.get(**key) or _add(store, synthetic_run(target, method, rank, chosen[method],
                                                                              seed, "test")))
    return rows


def _add(store: Store, row: dict) -> dict:
    store.add(row)
    return row


# ------------------------------------------------------------------------------------------------------ BBC
BBC_STEPS, BBC_LRS, BBC_RANKS, BBC_SCAN = 60, [2e-4, 1e-3, 5e-3, 2e-2], [1, 2, 4, 8, 16], [1, 4, 16, 64]


#: The task options of each real task: (folder, study task name, metric, compare options)
REAL = {
    "bbc": ("bbc-topic", "accuracy", ["--model", "minilm", "--task", "bbc-topic", "--steps", str(BBC_STEPS)]),
    "headline": ("bbc-headline", "rougeL", ["--model", "smollm2", "--task", "bbc-headline", "--steps", "30",
                                            "--batch-size", "4", "--max-length", "128", "--eval-limit", "40"]),
}


def compare(output: str, method: str, extra: list[str], ranks, lrs, seeds, split: str, task: str = "bbc") -> list[dict]:
    """One resumable ``peft-loran compare`` sweep; its results as study rows."""
    name, metric, options = REAL[task]
    out = RUNS / task / output
    cmd = [sys.executable, "-m", "peft_loran", "compare", *options, "--methods", method,
           "--rank", ",".join(map(str, ranks)),
           "--lr", ",".join(f"{lr:g}" for lr in lrs), "--seed", ",".join(map(str, seeds)), "--eval-split", split,
           "--output-dir", str(out), "--quiet", *extra]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.DEVNULL)
    results = json.loads((out / "metrics.json").read_text())["results"]
    return [dict(task=name, method=output.split("@")[0], rank=r["rank"], lr=r["lr"], seed=r["seed"],
                 split=split, metric=metric, value=r["metrics"][metric], train_seconds=r["train_seconds"],
                 peak_memory_mb=r["peak_memory_mb"], nonlinear_share=r["nonlinear_share"],
                 nonlinear_beyond_scale=r.get("nonlinear_beyond_scale"),
                 effective_rank=r["effective_rank"], trainable_params=r["trainable_params"]) for r in results]


def committed_rows(task: str) -> list[dict]:
    """The rows of ``task`` already in docs/study/results.csv: a rerun reuses them instead of training them again
    (each is a finished run of the same command; delete the file to start over)."""
    if not (DOCS / "results.csv").exists():
        return []
    with open(DOCS / "results.csv") as fh:
        return [_typed(r) for r in csv.DictReader(fh) if r["task"] == task]


def _reuse_or_compare(done: list[dict], output: str, method: str, extra: list[str], ranks, lrs, seeds,
                      split: str, task: str = "bbc") -> list[dict]:
    """The committed rows of this sweep, plus a ``compare`` run for the ranks that have none yet."""
    name = output.split("@")[0]
    mine = [r for r in done if r["method"] == name and r["split"] == split and r["lr"] in lrs
            and r["seed"] in seeds and r["rank"] in ranks]
    # a rank counts as done when every seed of it is there (a partly finished rank runs again, whole)
    missing = [k for k in ranks if {r["seed"] for r in mine if r["rank"] == k} != set(seeds)]
    mine = [r for r in mine if r["rank"] not in missing]
    if missing:
        suffix = "" if missing == list(ranks) else "-r" + "-".join(map(str, missing))
        mine += compare(output + suffix, method, extra, missing, lrs, seeds, split, task)
    return mine


def run_bbc() -> list[dict]:
    done = committed_rows(REAL["bbc"][0])
    rows = _reuse_or_compare(done, "lora-scan", "lora", [], BBC_SCAN, [1e-3], [0], "validation")
    chosen = {}
    for name, (method, extra) in METHODS.items():
        lr_rows = _reuse_or_compare(done, f"{name}@lr", method, extra, [4], BBC_LRS, [0], "validation")
        lr_rows = [r for r in lr_rows if r["method"] == name]
        rows += lr_rows
        chosen[name] = max(lr_rows, key=lambda r: r["value"])["lr"]
        print(f"bbc {name}: lr {chosen[name]:g}", flush=True)
    for name, (method, extra) in METHODS.items():
        rows += _reuse_or_compare(done, f"{name}@test", method, extra, BBC_RANKS, [chosen[name]], SEEDS, "test")
    return rows


HEADLINE_METHODS = ["lora", "sine"]
HEADLINE_LRS, HEADLINE_SEEDS = [5e-4, 2e-3], [0]


def run_headline() -> list[dict]:
    """SmolLM2 headline generation: minutes per run on 2 CPU cores, so two methods (LoRA and Sine-LoRA, the one
    with a large non-linear share), two learning rates on validation, then rank 4 with one seed."""
    rows, chosen = [], {}
    for name in HEADLINE_METHODS:
        method, extra = METHODS[name]
        lr_rows = compare(f"{name}@lr", method, extra, [4], HEADLINE_LRS, [0], "validation", task="headline")
        rows += lr_rows
        chosen[name] = max(lr_rows, key=lambda r: r["value"])["lr"]
        print(f"headline {name}: lr {chosen[name]:g}", flush=True)
    for name in HEADLINE_METHODS:
        method, extra = METHODS[name]
        rows += compare(f"{name}@test", method, extra, [4], [chosen[name]], HEADLINE_SEEDS, "test", task="headline")
    return rows


# ---------------------------------------------------------------------------------------------------- report
FIELDS = ["task", "method", "rank", "lr", "seed", "split", "metric", "value", "train_seconds", "peak_memory_mb",
          "nonlinear_share", "nonlinear_beyond_scale", "effective_rank", "trainable_params"]


def write_results(rows: list[dict]) -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    tmp = DOCS / ".results.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    os.replace(tmp, DOCS / "results.csv")


def summarize(rows: list[dict]) -> str:
    """Per task: mean +- std per method and rank over seeds (test split), paired difference to LoRA with an exact
    sign-flip p-value, time, non-linear share, effective rank."""
    from peft_loran_cli.report import sign_flip_p

    def mean_std(values):
        m = sum(values) / len(values)
        return m, (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0

    out = []
    for task in sorted({r["task"] for r in rows}):
        test = [r for r in rows if r["task"] == task and r["split"] == "test"]
        if not test:
            continue
        out.append(f"### {task}\n")
        bound = task.startswith("synthetic")
        metric = "explained energy" if bound else test[0]["metric"]
        out.append("| method | rank | lr | seeds | " + metric +
                   " (mean +- std) | vs LoRA, paired (p) | " + ("rank-r bound | " if bound else "") +
                   "train s | non-linear share | effective rank |")
        out.append("|---" * (10 if bound else 9) + "|")
        lora = {(r["rank"], r["seed"]): r["value"] for r in test if r["method"] == "lora"}
        for rank in sorted({r["rank"] for r in test}):
            for method in METHODS:
                cell = [r for r in test if r["method"] == method and r["rank"] == rank]
                if not cell:
                    continue
                m, s = mean_std([r["value"] for r in cell])
                diffs = [r["value"] - lora[(rank, r["seed"])] for r in cell if (rank, r["seed"]) in lora]
                paired = ""
                if method != "lora" and diffs:
                    dm, ds = mean_std(diffs)
                    p = sign_flip_p(diffs)
                    paired = f"{dm:+.4f} +- {ds:.4f}" + (f" (p={p:.3f})" if p is not None else "")
                shares = [r["nonlinear_share"] for r in cell if r["nonlinear_share"] not in (None, "")]
                ranks = [r["effective_rank"] for r in cell if r["effective_rank"] not in (None, "")]
                out.append(
                    f"| {method} | {rank} | {cell[0]['lr']:g} | {len(cell)} | {m:.4f} +- {s:.4f} | {paired} | "
                    + (f"{rank_bound(task.split('-', 1)[1], rank):.4f} | " if bound else "")
                    + f"{mean_std([r['train_seconds'] for r in cell])[0]:.1f} | "
                    f"{format(max(map(float, shares)), '.1e') if shares else ''} | "
                    f"{format(mean_std(list(map(float, ranks)))[0], '.1f') if ranks else ''} |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows if r["split"] == "test"})
    cols = min(3, len(tasks))
    grid_rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(5.5 * cols, 4.3 * grid_rows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, tasks):
        test = [r for r in rows if r["task"] == task and r["split"] == "test"]
        for i, method in enumerate(METHODS):
            ranks = sorted({r["rank"] for r in test if r["method"] == method})
            if not ranks:
                continue
            values = [[r["value"] for r in test if r["method"] == method and r["rank"] == k] for k in ranks]
            means = [sum(v) / len(v) for v in values]
            stds = [(sum((x - m) ** 2 for x in v) / max(1, len(v) - 1)) ** 0.5 for v, m in zip(values, means)]
            ax.errorbar(ranks, means, yerr=stds, label=method, marker="oxs^D"[i], linestyle=["-", "--", ":", "-.", "-"][i],
                        capsize=3, markerfacecolor="none")
        if task.startswith("synthetic"):
            ranks = sorted({r["rank"] for r in test})
            ax.plot(ranks, [rank_bound(task.split("-", 1)[1], k) for k in ranks], "k--", alpha=0.5,
                    label="best linear rank-r update")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["rank"] for r in test}))
        ax.set_xticklabels([str(k) for k in sorted({r["rank"] for r in test})])
        ax.set_xlabel("rank r")
        ax.set_ylabel("explained energy" if task.startswith("synthetic") else
                      ("test accuracy" if task == "bbc-topic" else "test ROUGE-L"))
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "by_rank.png", dpi=110)
    plt.close(fig)
    scan = [r for r in rows if r["task"] == "bbc-topic" and r["method"] == "lora-scan" and r["split"] == "validation"
            and r["lr"] == 1e-3 and r["seed"] == 0]
    if len({r["rank"] for r in scan}) > 2:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        scan = sorted({r["rank"]: r for r in scan}.values(), key=lambda r: r["rank"])
        ax.plot([r["rank"] for r in scan], [r["value"] for r in scan], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["rank"] for r in scan])
        ax.set_xticklabels([str(r["rank"]) for r in scan])
        ax.set_xlabel("LoRA rank r")
        ax.set_ylabel("validation accuracy (seed 0)")
        ax.set_title("bbc-topic: does rank limit LoRA?")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(DOCS / "bbc_lora_rank_scan.png", dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["synthetic", "bbc", "headline"], help="run one task (default: all)")
    args = parser.parse_args()
    rows = []
    if args.only in (None, "synthetic"):
        rows += run_synthetic()
    if args.only in (None, "bbc"):
        rows += run_bbc()
    if args.only in (None, "headline"):
        rows += run_headline()
    existing = []
    prefix = {"synthetic": "synthetic", "bbc": "bbc-topic", "headline": "bbc-headline"}
    if args.only and (DOCS / "results.csv").exists():  # keep the other tasks' rows
        with open(DOCS / "results.csv") as fh:
            existing = [_typed(r) for r in csv.DictReader(fh) if not r["task"].startswith(prefix[args.only])]
    rows = existing + rows
    write_results(rows)
    (DOCS / "tables.md").write_text(summarize(rows) + "\n")
    plot(rows)
    print(f"wrote {DOCS}/results.csv, tables.md, by_rank.png")


def _typed(row: dict) -> dict:
    out = dict(row)
    for k in ("rank", "seed", "trainable_params"):
        out[k] = int(out[k]) if out.get(k) not in (None, "") else None
    for k in ("lr", "value", "train_seconds", "peak_memory_mb", "nonlinear_share", "nonlinear_beyond_scale",
              "effective_rank"):
        out[k] = float(out[k]) if out.get(k) not in (None, "") else None
    return out


if __name__ == "__main__":
    main()
