"""``peft-loran export``: a LoRAN adapter as a plain PEFT LoRA adapter (``--to-lora``) or a merged transformers model
(``--merge``), written through the command line's :class:`~.outputs.OutputFolder` by the library's exporters."""

from __future__ import annotations

import json
from typing import Optional

from .errors import UserError
from .loading import LoadedAdapter
from .outputs import OutputFolder
from .files import TASK_RECORD

SAMPLE_TEXTS = [
    "The committee published its report on the future of public transport on Monday.",
    "Shares in the company rose sharply after it announced record profits.",
    "Summarise: the match ended in a draw after a late goal in extra time.",
]

#: How to load an exported classifier with its own label names, with plain transformers and PEFT (no peft_loran).
LOAD_CLASSIFIER = """import json
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

labels = json.load(open("{folder}/peft_loran_task.json"))  # id2label / label2id, in the order of the outputs
base = AutoModelForSequenceClassification.from_pretrained("{base}", id2label={{int(i): n for i, n in labels["id2label"].items()}}, label2id=labels["label2id"])
model = PeftModel.from_pretrained(base, "{folder}")"""


def sample_inputs(model, tokenizer) -> dict:
    """Inputs for export's LoRAN-vs-LoRA comparison: the sample texts, or (a base saved without a tokenizer) the same
    number of seeded random token sequences."""
    import torch

    if tokenizer is not None:
        return dict(tokenizer(SAMPLE_TEXTS, return_tensors="pt", padding=True, truncation=True, max_length=32))
    vocab = model.get_input_embeddings().num_embeddings
    return {"input_ids": torch.randint(0, vocab, (len(SAMPLE_TEXTS), 16), generator=torch.Generator().manual_seed(0))}


def classifier_note(record: Optional[dict], folder: str = "this_folder") -> str:
    """The model card's section on loading a classifier export with its class names (empty for other tasks)."""
    if not record or record.get("kind") != "classify":
        return ""
    code = LOAD_CLASSIFIER.format(folder=folder, base=record["base_model"])
    return (f"\n## Loading the classifier with its class names ({', '.join(record['labels'])})\n\n"
            "The base model's config has no class names; `peft_loran_task.json` in this folder has them:\n\n"
            f"```python\n{code}\n```\n")


def _library_errors(exc: Exception) -> UserError:
    return UserError(str(exc).splitlines()[0])


def export_to_lora(loaded: LoadedAdapter, rank: str, folder: OutputFolder, overwrite: bool) -> None:
    """Write the adapter as LoRA of ``rank`` (``"8"`` or ``"auto:TOL"``) and print how close it is."""
    from peft_loran.export import export_lora

    record = loaded.record
    with folder.staged(overwrite) as tmp:
        try:
            report = export_lora(loaded.model, tmp, rank, sample_inputs=sample_inputs(loaded.model, loaded.tokenizer),
                                 overwrite=True, tokenizer=loaded.tokenizer, card_note=classifier_note(record),
                                 extra_files={TASK_RECORD: json.dumps(record, indent=2) + "\n"} if record else None)
        except ValueError as exc:
            raise _library_errors(exc) from None
    worst = max(report["modules"], key=lambda m: m["relative_error"])
    ranks = sorted(m["rank"] for m in report["modules"])
    rank_text = (f"rank {ranks[0]}" if ranks[0] == ranks[-1] else
                 f"ranks {ranks[0]} to {ranks[-1]}, median {ranks[len(ranks) // 2]}")
    sample = report["sample_outputs"]
    out = folder.path
    print(f"exported {len(report['modules'])} adapted modules as LoRA ({rank_text}) to {out}")
    print(f"largest relative error of a module's update: {worst['relative_error']:.3e} ({worst['module']}); "
          f"energy kept >= {min(m['energy_kept'] for m in report['modules']):.9f}")
    print(f"on {len(SAMPLE_TEXTS)} sample texts: max |LoRAN - LoRA| output difference "
          f"{sample['max_abs_difference']:.3e} = {sample['relative_to_adapter_effect']:.3e} of the adapter's effect "
          f"(max {sample['max_abs_adapter_effect']:.3e}); per module: {out}/export_report.json")


def export_merged_model(loaded: LoadedAdapter, folder: OutputFolder, overwrite: bool) -> None:
    """Write the base model with the update merged into its weights, loadable without PEFT."""
    from peft_loran.export import export_merged

    with folder.staged(overwrite) as tmp:
        try:
            note = export_merged(loaded.model, tmp, tokenizer=loaded.tokenizer, overwrite=True)
        except ValueError as exc:
            raise _library_errors(exc) from None
    how = ("4-bit base dequantized, update added in float32, saved in bfloat16" if note["quantized_base"]
           else f"saved in {note['saved_dtype']}")
    print(f"wrote the merged model to {folder.path} ({how}); load it with transformers' from_pretrained, no PEFT")
