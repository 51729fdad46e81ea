"""Worker for tests/test_distributed.py, launched with torchrun (gloo on CPU).

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py --mode ddp --out DIR

Trains a tiny Llama with a LoRAN adapter for a few steps on a fixed global batch, each rank taking its shard, then
saves the adapter from rank 0 in PEFT format (``DIR/adapter``). ``--mode single`` runs the same global batch in one
process (the reference). ``--mode fsdp2`` shards every decoder layer and the root with ``fully_shard``, also
writes a sharded checkpoint with torch.distributed.checkpoint, reloads it into a freshly sharded model and records
whether the reloaded model gives the same logits (``DIR/fsdp_reload.json``).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import peft_loran  # noqa: F401
from peft import get_peft_model
from peft_loran import LoranConfig

STEPS, LR, GLOBAL_BATCH, SEQ = 3, 0.5, 4, 8


def build():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    base = LlamaForCausalLM(config)
    torch.manual_seed(1)
    lora_config = LoranConfig(target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False,
                              sinter_amplitude=0.5, sinter_frequency=3.0)
    return get_peft_model(base, lora_config)


def batch():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 64, (GLOBAL_BATCH, SEQ), generator=g)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["single", "ddp", "fsdp2"], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)

    distributed = args.mode != "single"
    if distributed:
        # a collective that never completes fails after 2 minutes instead of hanging the test
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    ids = batch()
    local = ids.chunk(world)[rank]

    folded_calls = count_folded_calls()
    model = build()
    peft_model = model
    if args.mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif args.mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in peft_model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(peft_model, mesh=mesh)

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    for _ in range(STEPS):
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    if args.mode == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(peft_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        fsdp_reload(peft_model, out, ids)
        if rank == 0:
            (out / "fused.json").write_text(json.dumps({"folded_calls": folded_calls[0]}))
    if rank == 0:
        if args.mode == "fsdp2":
            # gather to rank 0, then save in PEFT format from an unsharded copy
            plain = build()
            missing, unexpected = plain.load_state_dict(full, strict=False)
            assert not unexpected, unexpected
            plain.save_pretrained(out / "adapter")
        else:
            peft_model.save_pretrained(out / "adapter")
        peft_model.eval()
        if args.mode != "fsdp2":
            with torch.no_grad():
                torch.save(peft_model(input_ids=ids).logits, out / "eval_logits.pt")
    if distributed:
        # Free the DDP/FSDP wrapper (its reducer holds the process group) before the group goes, and leave without
        # the interpreter's teardown: a rank now and then hung for minutes in C++ destructors (gloo, the DDP
        # reducer) as main() returned, after all results were written (seen in CI and in 1 of 8 local runs).
        del model, opt
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def count_folded_calls() -> list[int]:
    """Count forward calls of the fused Function that folded the update into the base weight."""
    from peft_loran import update as functional

    counter = [0]
    original = functional.FusedLoranMatmul.apply

    def counting(*args):
        counter[0] += args[1] is not None  # a base weight was passed: the folded path
        return original(*args)

    functional.FusedLoranMatmul.apply = counting
    return counter


def fsdp_reload(trained, out: Path, ids: torch.Tensor) -> None:
    """Sharded save with torch.distributed.checkpoint, reload into a fresh sharded model, compare logits."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    options = StateDictOptions(ignore_frozen_params=True, strict=False)  # only the adapter is checkpointed
    dcp.save(get_model_state_dict(trained, options=options), checkpoint_id=str(out / "sharded"))
    fresh = build()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in fresh.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(fresh, mesh=mesh)
    state = get_model_state_dict(fresh, options=options)
    dcp.load(state, checkpoint_id=str(out / "sharded"))
    set_model_state_dict(fresh, state, options=options)
    trained.eval()
    fresh.eval()
    with torch.no_grad():
        a = trained(input_ids=ids).logits
        b = fresh(input_ids=ids).logits
    if dist.get_rank() == 0:
        (out / "fsdp_reload.json").write_text(json.dumps({"max_abs_diff": float((a - b).abs().max())}))
        torch.save(a, out / "eval_logits.pt")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # a hang anywhere prints every thread's stack to stderr (which the test shows) and exits
    faulthandler.dump_traceback_later(240, exit=True, file=sys.stderr)
    main()
