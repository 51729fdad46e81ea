"""The command line on data nobody here prepared: the defects a careful user found, each checked so it can fail."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peft_loran_cli import report
from peft_loran_cli.data import read_rows
from peft_loran_cli.evaluation import label_counts, majority_baseline

from .conftest import TOPICS
from .test_cli import error_line, run

REPO = Path(__file__).resolve().parents[1]


def train_classifier(tiny_encoder, cls_file, out: Path, *extra: str) -> Path:
    assert run(["train", "--model", tiny_encoder, "--train-file", cls_file, "--steps", "2", "--batch-size", "4",
                "--method", "loran", "--output-dir", str(out), "--quiet", *extra]) == 0
    return out / "adapter"


def test_lora_export_of_a_classifier_loads_with_its_label_names_in_plain_peft(tiny_encoder, cls_file, tmp_path):
    adapter = train_classifier(tiny_encoder, cls_file, tmp_path / "run")
    export = tmp_path / "lora"
    assert run(["export", str(adapter), "--to-lora", "4", "--output-dir", str(export), "--quiet"]) == 0
    config = json.loads((export / "adapter_config.json").read_text())
    assert len(config["modules_to_save"]) == len(set(config["modules_to_save"])), config["modules_to_save"]
    card = (export / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0].replace("this_folder", str(export))
    # a process that never imports peft_loran: the card's lines, then the labels the model reports
    check = code + "\nimport sys\nassert 'peft_loran' not in sys.modules\nprint(json.dumps(model.config.id2label))"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {str(i): name for i, name in enumerate(sorted(TOPICS))}


def test_evaluate_reproduces_the_number_and_split_the_run_reported(tiny_encoder, cls_file, tmp_path, capsys):
    for split, limit in (("test", "2"), ("validation", "2")):
        out = tmp_path / split
        adapter = train_classifier(tiny_encoder, cls_file, out, "--eval-limit", limit, "--eval-split", split)
        reported = json.loads((out / "metrics.json").read_text())["metrics"]
        capsys.readouterr()
        assert run(["evaluate", str(adapter), "--quiet"]) == 0
        printed = capsys.readouterr().out
        again = json.loads(printed.splitlines()[0])
        assert again["n"] == reported["n"] == int(limit)
        assert again["accuracy"] == reported["accuracy"] and f"{split} examples" in printed


def test_a_constant_prediction_is_named_in_metrics_table_and_plot(tmp_path):
    from peft_loran_cli.data import Example, TaskData

    labels = ["a", "b", "c"]
    train_counts = label_counts([Example("x", label=k) for k in (0, 1, 1, 2)], labels)
    assert train_counts == {"a": 1, "b": 2, "c": 1}
    examples = [Example("y", label=k) for k in (1, 1, 0, 2, 1)]
    assert majority_baseline(labels, train_counts, examples, [1, 1, 1, 1, 1]) == {
        "majority_label": "b", "majority_rate": 0.6, "majority_from": "training split", "predicted_classes": 1, "classes": 3,
        "note": "predicts a single class (b) for every example"}
    assert "note" not in majority_baseline(labels, train_counts, examples, [1, 0, 1, 2, 1])
    # the training split's majority, not the evaluated examples' (c is the most frequent there: an oracle baseline)
    evaluated = [Example("z", label=k) for k in (2, 2, 0)]
    assert majority_baseline(labels, train_counts, evaluated, [0, 2, 2])["majority_label"] == "b"
    # a tie in the training split is flagged
    tied = majority_baseline(labels, {"a": 2, "b": 2, "c": 1}, evaluated, [0, 2, 2])
    assert tied["majority_tie"] == ["a", "b"] and tied["majority_rate"] == 1 / 3
    # no training counts at all (an adapter from an older version): the evaluated examples', and it says so
    fallback = majority_baseline(labels, {}, evaluated, [0, 2, 2])
    assert fallback["majority_label"] == "c" and fallback["majority_from"].startswith("evaluated examples")
    metrics = {"accuracy": 0.6, "macro_f1": 0.25, "n": 5, "majority_label": "b", "majority_rate": 0.6}
    results = [dict(method=m, rank=4, lr=1e-3, seed=0, trainable_params=10, train_seconds=1.0, peak_memory_mb=1.0,
                    loss_curve=[(1, 2.0), (2, 1.5)], metrics={**metrics, "predicted_classes": k})
               for m, k in (("lora", 1), ("loran", 2))]
    table = report.comparison_table(results, "accuracy")
    assert "| 5 | 0.6000 (b) |" in table and "0.6000 (single class)" in table and "loran | 1 | 0.6000 |" in table
    assert [(a["method"], b["method"]) for a, b in report.identical_curves(results)] == [("lora", "loran")]
    assert report.same_curve_note(report.identical_curves(results), results) == \
        "lora and loran: the same curve (within 1e-3)"
    seeded = [{**r, "seed": seed} for seed in (0, 1) for r in results]
    assert report.same_curve_note([(seeded[0], seeded[1]), (seeded[2], seeded[3])], seeded) == \
        "lora and loran: the same curve at seeds 0, 1 (within 1e-3)"
    report.plot_comparison(results, "accuracy", tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_overwrite_never_removes_a_file_given_as_output_dir(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    for command in (["compare"], ["train"]):
        assert run([*command, "--output-dir", str(target), "--overwrite"]) == 2
        assert "is a file, not a directory" in error_line(capsys)
    assert target.read_text() == "keep me"


def test_csv_fields_longer_than_the_csv_default_limit(tmp_path):
    body = "word " * 40_000  # 200,000 characters: a raw mail with a long body
    path = tmp_path / "mails.csv"
    path.write_text(f'text,label\n"{body}",spam\nshort,ham\n')
    rows = read_rows(str(path))
    assert rows[0]["text"] == body and rows[1]["label"] == "ham"


def test_export_with_a_base_model_saved_without_a_tokenizer(tiny_encoder, cls_file, tmp_path):
    adapter = train_classifier(tiny_encoder, cls_file, tmp_path / "run")
    bare = tmp_path / "bare-model"
    shutil.copytree(tiny_encoder, bare)
    stripped = tmp_path / "adapter-no-tokenizer"
    shutil.copytree(adapter, stripped)
    for folder in (bare, stripped):
        for name in ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
    assert run(["export", str(stripped), "--model", str(bare), "--to-lora", "4", "--output-dir",
                str(tmp_path / "lora"), "--quiet"]) == 0
    assert run(["export", str(adapter), "--model", str(bare), "--to-lora", "4", "--output-dir",
                str(tmp_path / "lora2"), "--quiet"]) == 0
    assert (tmp_path / "lora2" / "tokenizer_config.json").exists()  # the adapter's own tokenizer travels along


def test_checks_that_need_no_model_answer_without_importing_torch(tmp_path):
    """Every numeric option and the user's data files are checked before torch, transformers or PEFT are imported
    (loading them takes seconds to minutes; these answers take a fraction of a second)."""
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("body,cat\nhello,a\n")
    cases = [["compare", "--rank", "0"], ["compare", "--rank", "4,-1"], ["train", "--steps", "-1"],
             ["compare", "--epochs", "0"], ["compare", "--batch-size", "0"], ["compare", "--grad-accum", "0"],
             ["compare", "--max-length", "0"], ["compare", "--eval-limit", "0"], ["compare", "--alpha", "-1"],
             ["compare", "--dropout", "1"], ["compare", "--lr", "0"], ["compare", "--sinter-amplitude", "nan"],
             ["compare", "--sinter-frequency", "inf"], ["compare", "--sine-frequency", "0"],
             ["compare", "--train-file", str(bad_csv)], ["train", "--train-file", str(tmp_path / "missing.jsonl")],
             ["compare", "--methods", "lora,loran:bogus"], ["train", "--method", "lorax"]]
    output = ["--output-dir", str(tmp_path / "o")]
    cases = [case + output for case in cases]
    # refused combinations, damaged files and outputs that may not be replaced: answered before torch too
    good_csv = tmp_path / "good.csv"
    good_csv.write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(20)))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORAN", "base_model_name_or_path": ""}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{}")
    users = tmp_path / "users_folder"
    users.mkdir()
    (users / "draft.txt").write_text("mine")
    cases += [["compare", "--task", "bbc-topic", "--train-file", str(good_csv), *output],
              ["train", "--eval-file", str(good_csv), *output], ["train", "--steps", "5", "--epochs", "1", *output],
              ["compare", "--methods", "lora,lora", *output],
              ["export", str(adapter), "--to-lora", "x", *output],
              ["inspect", str(adapter)],
              ["train", "--task", "bbc-headline", "--model", "minilm", *output],
              ["train", "--train-file", str(good_csv), "--output-dir", str(users), "--overwrite"]]
    script = f"""
import sys, time, json
import peft_loran_cli
answers = []
for argv in {json.dumps(cases)}:
    started = time.perf_counter()
    try:
        peft_loran_cli.main(argv)
    except SystemExit as exc:
        answers.append((exc.code, time.perf_counter() - started))
print(json.dumps({{"answers": answers, "heavy": sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert [code for code, _ in result["answers"]] == [2] * len(cases)
    assert max(seconds for _, seconds in result["answers"]) < 1.0
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == len(cases) and "--rank must be a positive integer, got -1" in lines[1]
    assert "Unknown activation 'bogus'" in lines[16] and "unknown method 'lorax'" in lines[17]
    expected = ["not both", "--eval-file needs --train-file", "--steps or --epochs, not both",
                "--methods must list distinct methods", "--to-lora: `rank` must be a positive integer",
                "is truncated or not a safetensors file", "needs a causal LM", "draft.txt"]
    for line, words in zip(lines[18:], expected, strict=True):
        assert words in line, (words, line)


def test_evaluating_a_classifier_as_generation_names_the_task_kind(tiny_encoder, cls_file, gen_file, tmp_path, capsys):
    adapter = train_classifier(tiny_encoder, cls_file, tmp_path / "run")
    assert run(["evaluate", str(adapter), "--eval-file", gen_file, "--task-type", "generate"]) == 2
    assert "trained for classification" in error_line(capsys)


def test_quiet_hides_the_gguf_reader_bar_and_cards_name_method_and_model(tiny_encoder, cls_file, tmp_path, capfd,
                                                                        monkeypatch):
    import transformers
    from tqdm.auto import tqdm

    from peft_loran_cli import models

    def drawing_loader(*args, **kwargs):
        for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        raise RuntimeError("stop after the bar")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", drawing_loader)
    for quiet in (True, False):
        with pytest.raises(RuntimeError, match="stop after the bar"):
            models.convert_gguf(tmp_path / "x.gguf", tmp_path / "converted", quiet=quiet)
        assert ("GGUF tensors" in capfd.readouterr().err) is not quiet
    monkeypatch.undo()
    adapter = train_classifier(tiny_encoder, cls_file, tmp_path / "run")
    title = (adapter / "README.md").read_text().split("---\n")[2].strip().splitlines()[0]
    assert title == f"# LoRAN adapter for {Path(tiny_encoder).name}"


def test_progress_bars_end_their_line(tiny_encoder, cls_file, tmp_path, capfd):
    assert run(["compare", "--model", tiny_encoder, "--train-file", cls_file, "--steps", "1", "--batch-size", "4",
                "--methods", "lora,loran", "--output-dir", str(tmp_path / "o")]) == 0
    err = capfd.readouterr().err.replace("\r", "\n")
    assert "evaluating" in err and "== [2/2]" in err
    assert not [line for line in err.splitlines() if "evaluating" in line and ("== [" in line or "|" in line.split(
        "evaluating")[0])]


def test_ctrl_c_stops_a_grid_at_once_keeps_finished_cells_and_prints_no_traceback(tiny_encoder, cls_file, tmp_path):
    out = tmp_path / "grid"
    command = subprocess.Popen(
        [sys.executable, "-m", "peft_loran_cli", "compare", "--model", tiny_encoder, "--train-file", cls_file,
         "--steps", "3000", "--batch-size", "4", "--methods", "lora", "--seed", "0,1", "--output-dir", str(out)],
        stderr=subprocess.PIPE, text=True, start_new_session=True,  # not --quiet: progress bars, warnings shown
        # Ctrl-C as in a terminal even where pytest itself runs with SIGINT ignored (a shell's background job):
        # an ignored SIGINT is inherited and would make the command ignore it too
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out / "adapters").exists():
            time.sleep(0.5)
        time.sleep(8)  # the first cell is training
        os.killpg(command.pid, signal.SIGINT)  # as a terminal's Ctrl-C does: to every process of the command
        started = time.time()
        _, err = command.communicate(timeout=60)
        stopped_after = time.time() - started
    finally:
        command.kill()
    assert command.returncode == 130, err
    assert stopped_after < 20, f"Ctrl-C took {stopped_after:.0f} s"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "leaked" not in err, err
    assert any(line.startswith("interrupted;") for line in err.replace("\r", "\n").splitlines()), err  # own line
    assert not list((out / "cells").glob("*.json"))


def test_evaluate_scores_the_split_it_is_asked_for(tiny_encoder):
    from peft_loran_cli.data import Example, TaskData
    from peft_loran_cli.evaluation import evaluate
    from peft_loran_cli.loading import BaseLoading, load_base
    from peft_loran_cli.settings import Settings

    task = TaskData("t", "classify", train=[Example("x y", label=0), Example("y z", label=1)],
                    validation=[Example("v", label=0)] * 2, test=[Example("t", label=1)] * 5, labels=["a", "b"])
    for split, n in (("validation", 2), ("test", 5)):
        settings = Settings(eval_split=split, quiet=True)
        model, tokenizer = load_base(tiny_encoder, task.kind, task.labels, BaseLoading())
        assert evaluate(model.eval(), tokenizer, task, settings)["n"] == n
