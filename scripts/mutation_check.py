"""Mutation check: put deliberate bugs into a copy of the package, one at a time, and run the tests that should
catch each. A mutation the suite does not catch is a hole in the tests. Run it before resolving a change to the
math (docs/testing.md):

    .venv/bin/python scripts/mutation_check.py            # all mutations (about 10 minutes on 2 cores)
    .venv/bin/python scripts/mutation_check.py scaling    # the ones whose name contains "scaling"

Each mutation is (name, file, exact text, replacement, test files). The text must occur exactly once, so a
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
PACKAGE = REPO / "src" / "peft_loran"

LAYERS = ["tests/test_layers.py", "tests/test_fused.py"]
MUTATIONS = [
    ("scaling dropped from the factor gradients", "functional.py",
     "grad_h = at_least_float32((g * scaling).T @ x) if need_factors else None",
     "grad_h = at_least_float32(g.T @ x) if need_factors else None", LAYERS),
    ("f instead of f' in Sinter's backward", "activations.py",
     "t = sin_u.addcmul_(u, torch.cos(u))  # sin(u) + u cos(u), so f'(BA) = 1 + a t",
     "t = sin_u.clone()", LAYERS),
    ("block bookkeeping: grad of A keeps only the last block", "functional.py",
     "                grad_A += dA\n", "                grad_A.copy_(dA)\n", LAYERS),
    ("eval cache ignores changed factors", "layer.py",
     "        return all(_same_values(old, new) for old, new in zip(self.snapshot, factors))",
     "        return True", ["tests/test_fused.py"]),
    ("merge orientation swapped", "layer.py",
     "add_to=target.T if self.fan_in_fan_out else target,",
     "add_to=target if self.fan_in_fan_out else target.T,", LAYERS),
    ("non-linearity in the input's dtype (half precision)", "functional.py",
     "    return t.to(torch.promote_types(t.dtype, torch.float32))", "    return t", ["tests/test_layers.py"]),
    ("eval cache built under autocast", "functional.py",
     "        with torch.autocast(A.device.type, enabled=False):\n            block = block_update(None if base",
     "        if True:\n            block = block_update(None if base", ["tests/test_layers.py"]),
    ("Sinter's non-linear part unscaled by a", "activations.py",
     "out.addcmul_(u, sin_u, value=k * a)", "out.addcmul_(u, sin_u, value=k)", LAYERS),
    ("the original's Swish as SiLU", "activations.py", "SWISH_BETA = 25.0", "SWISH_BETA = 1.0",
     ["tests/test_activations.py"]),
    ("embedding adapters zero the shared factor", "layer.py",
     "nn.init.zeros_(Ps[-1] if len(Ps) else self.loran_A[adapter_name])",
     "nn.init.zeros_(self.loran_B[adapter_name])", ["tests/test_original_compat.py"]),
    ("loading accepts missing adapter keys", "model.py",
     "    if not (missing or unexpected or wrong_shape):\n        return",
     "    if True:\n        return", ["tests/test_original_compat.py"]),
    ("zero-centring offset dropped in the compiled kernels", "kernels.py",
     "y = fn(u, *params) - offset", "y = fn(u, *params)", ["tests/test_kernels.py"]),
    ("export reports no error", "export.py",
     "relative = math.sqrt(error / total) if total > 0 else 0.0", "relative = 0.0", ["tests/test_export.py"]),
    ("original embedding keys not renamed", "compat.py",
     '_FACTOR_KEY = re.compile(r"(^|\\.)mlora_(?:embedding_)?(A|B)$")',
     '_FACTOR_KEY = re.compile(r"(^|\\.)mlora_(A|B)$")', ["tests/test_original_compat.py"]),
]


def run_one(name, filename, old, new, tests, workdir: Path) -> tuple[str, float]:
    copy = workdir / "src"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(PACKAGE, copy / "peft_loran", ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "peft_loran" / filename
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
