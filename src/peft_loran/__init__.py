"""peft-loran: LoRAN (Low-Rank Adaptation with Non-Linear Transformation) as a plug-in PEFT tuner.

``import peft_loran`` registers the method with PEFT, after which ``get_peft_model``,
``PeftModel.from_pretrained``, ``save_pretrained`` and transformers' ``load_adapter`` work with
:class:`LoranConfig` adapters and with checkpoints of the original code (peft_type ``MLORA``).
"""

from . import _notices  # noqa: F401  (first: before PEFT imports bitsandbytes)
from .activations import Activation, available_activations, get_activation, register_activation, unregister_activation
from .compat import CorruptCheckpointError, UnsafeCheckpointError, convert_original_checkpoint
from .compat import MLORA, MLoraConfig
from .config import LORAN, LoranConfig
from .export import export_lora, export_merged
from .kernels import kernel_compilation, set_kernel_compilation
from .layer import Embedding, Linear, LoranLayer
from .model import LoranModel, register_with_peft, set_eval_cache

register_with_peft()

__version__ = "0.5.0"

__all__ = [
    "LORAN", "MLORA", "Activation", "Embedding", "Linear", "LoranConfig", "LoranLayer", "LoranModel", "MLoraConfig",
    "CorruptCheckpointError", "UnsafeCheckpointError", "available_activations", "export_lora", "export_merged", "convert_original_checkpoint", "get_activation", "kernel_compilation",
    "register_activation", "register_with_peft", "set_eval_cache", "set_kernel_compilation",
    "unregister_activation",
]
