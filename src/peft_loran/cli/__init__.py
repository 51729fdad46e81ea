"""The ``peft-loran`` command line: LoRA-vs-LoRAN fine-tuning on bundled or user data. Never imported by the
library itself (``import peft_loran`` does not load it)."""
