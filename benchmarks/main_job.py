"""The README's main job, shortened: LoRAN's train time over LoRA's, as a new user meets it.

    python benchmarks/main_job.py [--runs 5] [--steps 60] [--json results/benchmarks/main-job.json]

Each run is one ``peft-loran compare --steps N --quiet`` (MiniLM on BBC topics, q/v, the command line's defaults)
in a new empty output folder with a new empty ``TORCHINDUCTOR_CACHE_DIR``; ``compare`` trains each method in a
process of its own and records its train time (``train_seconds``, the optimizer steps only). The order of the two
methods alternates from run to run so neither always runs first. Reported: each run's LoRAN / LoRA ratio and their
median. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import cpu_name, write_json  # noqa: E402


def one_run(steps: int, methods: list[str]) -> dict[str, float]:
    """Train times in seconds per method, from one ``compare`` in fresh folders."""
    with tempfile.TemporaryDirectory(prefix="main-job-") as scratch:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(scratch, "inductor"))
        out = os.path.join(scratch, "compare")
        subprocess.run([sys.executable, "-m", "peft_loran", "compare", "--steps", str(steps), "--quiet",
                        "--methods", ",".join(methods), "--output-dir", out],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(out, "metrics.json")) as fh:
            results = json.load(fh)["results"]
    return {r["method"]: r["train_seconds"] for r in results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--json", help="also write the runs here")
    args = parser.parse_args()

    runs = []
    for number in range(1, args.runs + 1):
        order = ["lora", "loran"] if number % 2 else ["loran", "lora"]
        started = time.perf_counter()
        seconds = one_run(args.steps, order)
        runs.append({"run": number, "order": ",".join(order), "lora_s": round(seconds["lora"], 2),
                     "loran_s": round(seconds["loran"], 2), "ratio": round(seconds["loran"] / seconds["lora"], 3),
                     "wall_s": round(time.perf_counter() - started, 1)})
        print(f"run {number} ({runs[-1]['order']}): LoRA {runs[-1]['lora_s']:.1f} s, LoRAN {runs[-1]['loran_s']:.1f} s,"
              f" LoRAN / LoRA {runs[-1]['ratio']:.3f}x", flush=True)
    median = statistics.median(r["ratio"] for r in runs)
    print(f"\n{cpu_name()}, {os.cpu_count()} cores, {args.steps} steps, {args.runs} runs: "
          f"median LoRAN / LoRA train time {median:.3f}x (runs {min(r['ratio'] for r in runs):.3f}-"
          f"{max(r['ratio'] for r in runs):.3f}x)")
    if args.json:
        record = {"command": "python benchmarks/main_job.py " + " ".join(sys.argv[1:]), "machine": cpu_name(),
                  "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "runs": runs, "median_ratio": median}
        write_json(args.json, record)


if __name__ == "__main__":
    main()
