"""Mutation check: put deliberate bugs into a copy of the package, one at a time, and run the tests that should
catch each. A mutation the suite does not catch is a hole in the tests. Run it before resolving a change to the
math (docs/testing.md):

    .venv/bin/python scripts/mutation_check.py            # all mutations (about 10 minutes on 2 cores)
    .venv/bin/python scripts/mutation_check.py scaling    # the ones whose name contains "scaling"

Each mutation is (name, file under src/, exact text, replacement, test files). The text must occur exactly once, so a
refactoring that moves the code makes the script fail loudly instead of silently testing nothing. Exit code 1 if
any mutation survived or no longer applies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "src"
PACKAGES = ("peft_loran", "peft_loran_cli")

LAYERS = ["tests/test_layers.py", "tests/test_fused.py"]
MUTATIONS = [
    ("scaling dropped from the factor gradients", "peft_loran/kernels.py",
     "chain_rows_backward(grad_h.mul_(scaling), B_rows", "chain_rows_backward(grad_h, B_rows", LAYERS),
    ("Sinter's derivative without its w x cos(w x) term", "peft_loran/activations.py",
     "wx.cos().mul_(wx).add_(s).mul_(a).add_(1)  # 1 + a (sin(wx) + wx cos(wx))",
     "wx.sin().mul_(a).add_(1)", LAYERS),
    ("block bookkeeping: grad of A keeps only the last block", "peft_loran/update.py",
     "                grads[0] += dA\n", "                grads[0].copy_(dA)\n", LAYERS),
    ("eval cache ignores changed factors", "peft_loran/cache.py",
     "        return all(_same_values(old, new) for old, new in zip(self.snapshot, factors))",
     "        return True", ["tests/test_fused.py"]),
    ("merge orientation swapped", "peft_loran/layer.py",
     "add_to_(target.T if self.fan_in_fan_out else target, sign)",
     "add_to_(target if self.fan_in_fan_out else target.T, sign)", LAYERS),
    ("non-linearity in the input's dtype (half precision)", "peft_loran/update.py",
     "        A = self.A.to(torch.promote_types(self.A.dtype, torch.float32))\n"
     "        B = self.B.to(torch.promote_types(self.B.dtype, torch.float32))\n",
     "        A, B = self.A, self.B\n", ["tests/test_layers.py"]),
    ("eval cache built under autocast", "peft_loran/update.py",
     "            with torch.autocast(device_type, enabled=False):", "            if True:", ["tests/test_layers.py"]),
    ("Sinter's non-linear part unscaled by a", "peft_loran/activations.py",
     "value = x.addcmul(x, s, value=a)", "value = x.addcmul(x, s)", LAYERS),
    ("the original's Swish as SiLU", "peft_loran/activations.py", '(("beta", 25.0),)', '(("beta", 1.0),)',
     ["tests/test_activations.py"]),
    ("embedding adapters zero the shared factor", "peft_loran/layer.py",
     "nn.init.zeros_(Ps[-1] if len(Ps) else self.loran_A[adapter_name])",
     "nn.init.zeros_(self.loran_B[adapter_name])", ["tests/test_original_compat.py"]),
    ("loading accepts missing adapter keys", "peft_loran/model.py",
     "    if not (missing or unexpected or wrong_shape):\n        return",
     "    if True:\n        return", ["tests/test_original_compat.py"]),
    ("zero-centring offset dropped in the compiled kernels", "peft_loran/kernels.py",
     "        y = y - offset\n", "        y = y\n", ["tests/test_kernels.py"]),
    ("export reports no error", "peft_loran/export.py",
     "relative = math.sqrt(error / total) if total > 0 else 0.0", "relative = 0.0", ["tests/test_export.py"]),
    ("original embedding keys not renamed", "peft_loran/compat.py",
     '_FACTOR_KEY = re.compile(r"(^|\\.)mlora_(?:embedding_)?(A|B)$")',
     '_FACTOR_KEY = re.compile(r"(^|\\.)mlora_(A|B)$")', ["tests/test_original_compat.py"]),
    # found by a mutation pass that the suite missed or caught only by accident (issue 19)
    ("export's energy kept as 1 - error", "peft_loran/export.py", "kept = 1 - error**2", "kept = 1 - error",
     ["tests/test_export.py"]),
    ("energy beyond r from sv[r+1:]", "peft_loran/diagnostics.py",
     '"energy_beyond_r": float((sv[r:] ** 2).sum() / energy)', '"energy_beyond_r": float((sv[r + 1:] ** 2).sum() / energy)',
     ["tests/test_diagnostics.py"]),
    ("data split ignores its seed", "peft_loran_cli/data.py", 'random.Random(f"{seed}/{group_key}").shuffle(group)',
     'random.Random(f"{SPLIT_SEED}/{group_key}").shuffle(group)', ["tests/test_data.py"]),
    ("4-bit CPU repacking not undone", "peft_loran/layer.py",
     "        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)",
     "        pass", ["tests/test_quantized.py"]),
    ("LoRA export drops alpha_pattern", "peft_loran/export.py", "alpha_pattern=dict(pattern),", "alpha_pattern={},",
     ["tests/test_export.py"]),
    ("evaluation scores the other split", "peft_loran_cli/evaluation.py",
     'split = task.validation if settings.eval_split == "validation" else task.test',
     'split = task.test if settings.eval_split == "validation" else task.validation',
     ["tests/test_cli_user_data.py::test_evaluate_scores_the_split_it_is_asked_for"]),
    ("diagnostics' dense update left unwritten", "peft_loran/diagnostics.py",
     "            write_dense_to[block.i0:block.i1] = block.value\n", "            write_dense_to[block.i0:block.i1] = 0\n",
     ["tests/test_diagnostics.py"]),
    ("MLoraConfig's use_b default off", "peft_loran/compat.py", "mlora_use_P=True, mlora_use_b=True, init_mlora_weights=True,",
     "mlora_use_P=True, mlora_use_b=False, init_mlora_weights=True,", ["tests/test_config_errors.py"]),
    # places no test was looking at before (issue 25), and the block plan (issue 26)
    ("eval cache ignores in-place changes to the base weight", "peft_loran/cache.py",
     "return (weight.data_ptr(), weight._version, weight.shape", "return (weight.data_ptr(), 0, weight.shape",
     ["tests/test_fused.py"]),
    ("majority baseline from the evaluated examples", "peft_loran_cli/evaluation.py",
     "counts = train_label_counts or label_counts(task.train, task.labels)",
     "counts = label_counts(examples, task.labels)", ["tests/test_cli_trust.py"]),
    ("majority baseline ties not flagged", "peft_loran_cli/evaluation.py",
     "    if len(tied) > 1:\n        out[\"majority_tie\"] = tied", "    if False:\n        out[\"majority_tie\"] = tied",
     ["tests/test_cli_user_data.py"]),
    ("ragged CSV rows accepted", "peft_loran_cli/data.py",
     "if None in row or any(v is None for v in row.values()):", "if None in row:", ["tests/test_cli.py"]),
    ("duplicate CSV columns accepted", "peft_loran_cli/data.py", "        if twice:  # DictReader",
     "        if False:  # DictReader", ["tests/test_cli.py"]),
    ("a missing column raises from deep inside", "peft_loran_cli/data.py",
     "        absent = [f for f in fields if f not in row]", "        absent = []", ["tests/test_cli.py"]),
    ("export's products over several blocks keep only the last", "peft_loran/update.py",
     "                out += block.to(X.dtype).T @ X[i0:i1]", "                out = block.to(X.dtype).T @ X[i0:i1]",
     ["tests/test_export.py"]),
    ("a merged half-precision weight gets the update rounded first", "peft_loran/update.py",
     "        for block in update.blocks(plan, base=target, out_dtype=target.dtype):\n"
     "            target[block.i0:block.i1] = block.value\n",
     "        for block in update.blocks(plan, out_dtype=target.dtype):\n"
     "            target[block.i0:block.i1] += block.value\n", ["tests/test_layers.py"]),
    ("a merge keeps the blocks' graph", "peft_loran/update.py",
     "    @torch.no_grad()\n    def add_to_(", "    def add_to_(", ["tests/test_layers.py"]),
    ("recorded examples not found: scored anyway", "peft_loran_cli/data.py", "    if missing:\n        where",
     "    if False:\n        where", ["tests/test_cli_trust.py"]),
    ("--overwrite removes files it did not write", "peft_loran_cli/outputs.py",
     "        foreign = self.foreign_files()\n", "        foreign = []\n", ["tests/test_cli_trust.py"]),
    ("the working folder may be replaced", "peft_loran_cli/outputs.py",
     "        if target == cwd or target in cwd.parents:", "        if False:", ["tests/test_cli_trust.py"]),
    ("a mixed batch's adapter rows get the base layer", "peft_loran/layer.py",
     "                out = self._adapted(x[rows], [adapter_name], *args, **kwargs)",
     "                out = self.base_layer(x[rows], *args, **kwargs)", ["tests/test_plan.py"]),
    ("the accelerator plan ignores its budget", "peft_loran/plan.py",
     "    need = max(1, math.ceil(rows * max(cols, 1) / budget))", "    need = 1", ["tests/test_plan.py"]),
    ("the compiled kernel where autograd must see the operations", "peft_loran/kernels.py",
     "    if (mode == \"0\" or not plain or autograd or", "    if (mode == \"0\" or not plain or",
     ["tests/test_kernels.py"]),
    # issue 33: what a 4-bit run recorded, content splits
    ("evaluate ignores how the run loaded its base", "peft_loran_cli/loading.py",
     "            return cls(loading.get(\"quantization\"))", "            return cls(None)",
     ["tests/test_trainers.py::test_a_4bit_run_is_evaluated_inspected_and_exported_on_its_4bit_base"]),
    ("a 4-bit classifier's head quantized", "peft_loran_cli/loading.py",
     "qlora_quantization(HEAD_MODULES if kind == \"classify\" else None)", "qlora_quantization(None)",
     ["tests/test_trainers.py::test_a_4bit_run_is_evaluated_inspected_and_exported_on_its_4bit_base"]),
    ("copies of a text split apart", "peft_loran_cli/data.py",
     "    if same is not None:\n        parts = _copies_on_one_side(parts, same)", "    if False:\n        pass",
     ["tests/test_data.py"]),
]


def run_one(name, filename, old, new, tests, workdir: Path) -> tuple[str, float]:
    copy = workdir / "src"
    if copy.exists():
        shutil.rmtree(copy)
    for package in PACKAGES:
        shutil.copytree(SOURCE / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / filename
    text = target.read_text()
    if text.count(old) != 1:
        return f"NOT APPLIED (text found {text.count(old)} times in {filename})", 0.0
    target.write_text(text.replace(old, new))
    env = dict(os.environ, PYTHONPATH=str(copy), PEFT_LORAN_COMPILE=os.environ.get("PEFT_LORAN_COMPILE", "0"))
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests],
        cwd=REPO, env=env, capture_output=True, text=True,
    )
    seconds = time.perf_counter() - started
    if result.returncode == 0:
        return "MISSED", seconds
    if result.returncode == 1:  # a test failed
        return "caught", seconds
    return f"ERROR (pytest exit {result.returncode}): {result.stdout[-400:]}{result.stderr[-400:]}", seconds


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not argv or any(a.lower() in m[0].lower() for a in argv)]
    with tempfile.TemporaryDirectory(prefix="peft-loran-mutants-") as tmp:
        rows, bad = [], 0
        for name, filename, old, new, tests in chosen:
            verdict, seconds = run_one(name, filename, old, new, tests, Path(tmp))
            bad += verdict != "caught"
            rows.append(f"| {name} | `{filename}` | {verdict} | {seconds:.0f} s |")
            print(rows[-1], flush=True)
    print(f"\n{len(chosen) - bad} of {len(chosen)} mutations caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
