"""Library notices that mislead our users, dropped before the libraries that log them are imported.

bitsandbytes (0.50, on CPUs with AVX-512 BF16) logs at import that it could not fetch an optional CPU kernel from
the Hugging Face hub ("Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels"): on a
machine that cannot or should not download code at run time it is noise, and it advises installing a package that
would. Only that one message is dropped, and only when peft_loran is imported before bitsandbytes (PEFT imports
it); everything else bitsandbytes logs is left alone.
"""

from __future__ import annotations

import logging

HUB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class NoHubKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(HUB_KERNEL_NOTICE)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(NoHubKernelNotice())
