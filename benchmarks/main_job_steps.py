"""The README's main job, one training step at a time: LoRA's and LoRAN's steps alternating in one process.

    python benchmarks/main_job_steps.py [--pairs 80]

`main_job.py` times the job as a user meets it, each method in a process of its own; on these machines two such
processes drift apart by 10% or more, which is as large as the difference being measured. Here both models (the
command line's own MiniLM, BBC-topic batches, LoRA and LoRAN configs, paired initialisation; dropout 0.05 as the
command line sets it) live in one process and take turns on the same batch, one optimizer step each, the order
alternating: the paired per-step ratio is LoRAN's steady-state cost on this job, without start-up or process drift.
Its floor is the three dense products per adapted layer that dropout leaves exact LoRAN with
(`benchmarks/three_products.py`). ``B`` starts from small random values (not zero) so both methods do the
arithmetic of a trained adapter. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import cpu_name  # noqa: E402
from interleaved import interleave  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=80, help="timed steps per method")
    args = parser.parse_args()

    import torch
    from peft import get_peft_model

    from peft_loran_cli.data import load_task
    from peft_loran_cli.encoding import Encoded, collate
    from peft_loran_cli.loading import BaseLoading, load_base
    from peft_loran_cli.methods import peft_config
    from peft_loran_cli.models import resolve_model
    from peft_loran_cli.settings import Settings
    from peft_loran_cli.training import paired_init, quiet_libraries

    quiet_libraries(True)
    settings, task = Settings(), load_task("bbc-topic")
    path = resolve_model(settings.model, quiet=True)
    models, optimizers = {}, {}
    for method in ("lora", "loran"):
        torch.manual_seed(0)
        model, tokenizer = load_base(path, task.kind, task.labels, BaseLoading(None))
        model = get_peft_model(model, peft_config(method, settings, task.kind, model.config.model_type))
        paired_init(model, 0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and ("lora_B" in name or "loran_B" in name):
                    p.normal_(std=0.01)
        models[method] = model.train()
        optimizers[method] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    encoded, batch = Encoded(task.train, tokenizer, task.kind, settings.max_length), collate(tokenizer)
    batches = [batch([encoded[i] for i in range(k * settings.batch_size, (k + 1) * settings.batch_size)])
               for k in range(20)]

    def stepper(method: str) -> Callable[[], None]:
        """One optimizer step on the method's next batch: each method is called once per round (and as often in
        warm-up), so a round's two steps see the same batch."""
        calls = itertools.count()

        def step() -> None:
            models[method](**batches[next(calls) % len(batches)]).loss.backward()
            optimizers[method].step()
            optimizers[method].zero_grad(set_to_none=True)

        return step

    runs = {method: stepper(method) for method in models}
    for step in runs.values():  # warm-up: two steps here, a third in interleave
        step(), step()
    times = interleave(runs, args.pairs)  # the order alternates every round
    ratios = sorted(a / b for a, b in zip(times["loran"], times["lora"]))
    lora, loran = statistics.median(times["lora"]), statistics.median(times["loran"])
    print(f"{cpu_name()}, {torch.get_num_threads()} threads; MiniLM, BBC topics, q/v, r {settings.rank}, dropout "
          f"{settings.dropout}, batch {settings.batch_size} x {settings.max_length} tokens, {args.pairs} pairs")
    print(f"step (median): LoRA {lora * 1e3:.0f} ms, LoRAN {loran * 1e3:.0f} ms (+{(loran - lora) * 1e3:.0f} ms); "
          f"LoRAN / LoRA paired per step: median {statistics.median(ratios):.3f}x, quartiles "
          f"{ratios[len(ratios) // 4]:.3f}-{ratios[3 * len(ratios) // 4]:.3f}x")


if __name__ == "__main__":
    main()
