"""Turning examples into model inputs: classification texts, and prompt + target for generation (the article cut
to fit the length budget), padded in batches."""

from __future__ import annotations

import torch

from .data import Example


PROMPT = "Article: {text}\nHeadline:"


class Encoded(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example], tokenizer, kind: str, max_length: int):
        self.items = [encode(e, tokenizer, kind, max_length) for e in examples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def encode(example: Example, tokenizer, kind: str, max_length: int) -> dict:
    if kind == "classify":
        enc = tokenizer(example.text, truncation=True, max_length=max_length)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": example.label}
    target = tokenizer(" " + example.target, add_special_tokens=False)["input_ids"][: max_length // 4]
    target = target + [tokenizer.eos_token_id]
    prompt_ids = tokenizer(prompt_text(example, tokenizer, max_length - len(target)),
                           add_special_tokens=False)["input_ids"][-(max_length - len(target)):]
    ids = prompt_ids + target
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt_ids) + target}


def prompt_text(example: Example, tokenizer, budget: int) -> str:
    """The prompt with the article cut to fit ``budget`` tokens (cut in words, then re-checked)."""
    words = example.text.split()
    text = " ".join(words[: max(8, budget)])
    while len(tokenizer(PROMPT.format(text=text), add_special_tokens=False)["input_ids"]) > budget and len(
            text.split()) > 8:
        text = " ".join(text.split()[: int(len(text.split()) * 0.8)])
    return PROMPT.format(text=text)


def collate(tokenizer):
    def fn(batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        pad = tokenizer.pad_token_id
        left = tokenizer.padding_side == "left"

        def padded(seq, value):
            fill = [value] * (width - len(seq))
            return fill + seq if left else seq + fill

        out = {"input_ids": torch.tensor([padded(b["input_ids"], pad) for b in batch]),
               "attention_mask": torch.tensor([padded(b["attention_mask"], 0) for b in batch])}
        if isinstance(batch[0]["labels"], list):
            out["labels"] = torch.tensor([padded(b["labels"], -100) for b in batch])
        else:
            out["labels"] = torch.tensor([b["labels"] for b in batch])
        return out

    return fn
