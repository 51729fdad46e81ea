"""How long the command line's evaluation of a saved adapter takes: LoRA against LoRAN on the same base and examples,
LoRAN as ``evaluate`` runs it (eval cache on while it evaluates) and with the cache off (every generated token
rebuilds ``f(BA)``), alternating in one process so that machine load hits all alike.

    python benchmarks/cli_eval_speed.py LORA_ADAPTER LORAN_ADAPTER [--limit 16] [--rounds 3]

Both adapters must have been written by ``peft-loran train``/``compare`` on the same base model and task (their task
records say which examples to score). Prints one JSON line per measurement and a summary with the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lora")
    parser.add_argument("loran")
    parser.add_argument("--limit", type=int, default=16, help="examples to score per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from peft_loran_cli import quiet_library_notices

    quiet_library_notices()
    import torch

    from peft_loran_cli.evaluation import evaluate
    from peft_loran_cli.loading import load_adapter_model
    from peft_loran_cli.options import build_parser, prepare_data
    from peft_loran_cli.settings import Settings

    torch.set_num_threads(2)
    models = {}
    for name, folder in (("lora", args.lora), ("loran", args.loran)):
        cli_args = build_parser().parse_args(["evaluate", folder, "--quiet"])
        prepare_data(cli_args)
        loaded = load_adapter_model(folder, quiet=True)
        task = cli_args.task_data
        task.test = task.test[: args.limit]
        settings = Settings(max_length=loaded.record["max_length"], quiet=True)
        models[name] = (loaded.model, loaded.tokenizer, task, settings)

    def run(name: str, cache: bool) -> float:
        model, tokenizer, task, settings = models[name]
        started = time.perf_counter()
        evaluate(model, tokenizer, task, settings, eval_cache=cache)  # cache: what the command line's evaluate does
        return time.perf_counter() - started

    cells = [("lora", True), ("loran", True), ("loran", False)]
    for name, cache in cells:  # warm-up
        run(name, cache)
    times: dict = {cell: [] for cell in cells}
    for _ in range(args.rounds):
        for cell in cells:
            times[cell].append(run(*cell))
            print(json.dumps({"adapter": cell[0], "cache": cell[1], "seconds": times[cell][-1]}), file=sys.stderr)
    lora = statistics.median(times[("lora", True)])
    summary = {"examples": args.limit, "rounds": args.rounds, "lora_s": lora,
               "loran_s": statistics.median(times[("loran", True)]),
               "loran_cache_off_s": statistics.median(times[("loran", False)])}
    summary["loran_vs_lora"] = summary["loran_s"] / lora
    summary["loran_cache_off_vs_lora"] = summary["loran_cache_off_s"] / lora
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
