"""Which layers a run will adapt, and how large its adapter will be, told from the model's config alone (the model
built on the meta device: no weights are read): so that a rank no layer can use, targets that match nothing, or
an adapter larger than the model itself are refused or reported before anything is loaded or trained."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from .errors import UserError
from .models import BUNDLED, _bundled_file, cache_dir

#: Above this share of the base model's parameters, the adapter's size is reported before training.
LARGE_ADAPTER_SHARE = 0.25


@dataclass
class AdaptedLayer:
    name: str
    rows: int  # out_features
    cols: int  # in_features

    @property
    def width(self) -> int:
        """The largest useful rank: ``B A`` is already full rank at ``min(out, in)``."""
        return min(self.rows, self.cols)


def model_config(spec: str, model_path: Optional[str] = None):
    """The model's transformers config without its weights (the bundled SmolLM2 read from its GGUF's metadata until
    it is converted)."""
    from transformers import AutoConfig

    if spec in BUNDLED and model_path is None:
        path = _bundled_file(spec)
        converted = cache_dir() / "SmolLM2-135M-Instruct"
        if spec == "smollm2" and not (converted / "config.json").exists():
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoConfig.from_pretrained(str(converted if spec == "smollm2" else path))
    return AutoConfig.from_pretrained(model_path or spec)


def meta_model(config, task_kind: str, num_labels: int = 2):
    """The model for ``config`` with the head the task uses, on the meta device (shapes only, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if task_kind == "classify":
            config.num_labels = max(2, num_labels)
            return AutoModelForSequenceClassification.from_config(config)
        return AutoModelForCausalLM.from_config(config)


def adapted_layers(model, peft_config) -> list[AdaptedLayer]:
    """The layers ``peft_config`` would adapt in ``model``, matched by PEFT's own rule, in model order."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    found = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, (nn.Linear, Conv1D, nn.Embedding)):
            continue
        match = check_target_module_exists(peft_config, name)
        if not match or type(match).__name__ == "_ExcludedModule":
            continue
        if isinstance(module, nn.Linear):
            rows, cols = module.out_features, module.in_features
        elif isinstance(module, Conv1D):
            cols, rows = module.weight.shape
        else:
            rows, cols = module.embedding_dim, module.num_embeddings
        found.append(AdaptedLayer(name, rows, cols))
    return found


def linear_module_names(model) -> list[str]:
    """The distinct last names of the model's linear layers (what ``--targets`` can name), in model order."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    names = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, Conv1D))]
    return list(dict.fromkeys(names))


def check_adapter_plan(spec: str, model_path: Optional[str], methods: list[str], ranks: list[int], settings,
                       task) -> list[AdaptedLayer]:
    """Refuse (one ``error:`` line) targets that match no layer and a rank above the smallest adapted layer's
    width; report an adapter larger than :data:`LARGE_ADAPTER_SHARE` of the base model. Before any weights load."""
    from .methods import peft_config

    config = model_config(spec, model_path)
    model = meta_model(config, task.kind, len(task.labels))
    base_params = sum(p.numel() for p in model.parameters())
    layers: list[AdaptedLayer] = []
    for method in methods:
        layers = adapted_layers(model, peft_config(method, settings, task.kind, config.model_type))
        if not layers:
            given = ",".join(settings.targets) if settings.targets else "the default targets"
            raise UserError(f"--targets {given} match no layer of {spec}; its linear layers are named: "
                            f"{', '.join(linear_module_names(model))}")
    narrowest = min(layers, key=lambda layer: layer.width)
    rank = max(ranks)
    if rank > narrowest.width:
        raise UserError(f"--rank {rank} is more than the smallest adapted layer's width: {narrowest.name} is "
                        f"{narrowest.rows} x {narrowest.cols}, so B A is already full rank at r = {narrowest.width} "
                        f"and a higher rank adds parameters, not expressiveness; use --rank {narrowest.width} or less")
    adapter_params = sum(rank * (layer.rows + layer.cols) for layer in layers)
    if adapter_params > LARGE_ADAPTER_SHARE * base_params:
        print(f"warning: at rank {rank} the adapter has {adapter_params:,} parameters ({adapter_params * 4 / 2**20:,.0f}"
              f" MB in float32, {adapter_params / base_params:.0%} of the base model's {base_params:,}); training "
              "needs about four times that for its gradients and optimizer state", file=sys.stderr, flush=True)
    return layers
