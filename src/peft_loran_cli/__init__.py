"""The ``peft-loran`` command line: LoRA-vs-LoRAN fine-tuning on bundled or user data.

This package is never imported by the library (``import peft_loran`` does not load it). Its entry point,
:func:`main`, stays light: it parses the arguments and answers ``--help`` and every input error that needs no model
(numbers, paths, the user's data files) from pure-Python modules (:mod:`.options`, :mod:`.data`) before anything
imports torch, transformers or PEFT; the commands themselves are in :mod:`.commands`.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from typing import Optional


def quiet_library_notices() -> None:
    """Before transformers and bitsandbytes are imported: bitsandbytes' CPU-kernel notice and transformers' load
    reports ("classifier.weight MISSING" for a new head, which is expected) stay hidden unless asked for
    (``TRANSFORMERS_VERBOSITY=info``). Used by the entry point and by each training process."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: Optional[list[str]] = None) -> None:
    """``peft-loran ...`` and ``python -m peft_loran ...``."""
    from .errors import UserError
    from .methods import methods_problem
    from .options import build_parser, early_problem, prepare_data

    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["peft-loran", *(sys.argv[1:] if argv is None else argv)])
    try:
        problem = early_problem(args) or methods_problem(args)
        if problem:
            raise UserError(problem)
        prepare_data(args)  # the user's data files are read and checked here, before any model is loaded
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    quiet_library_notices()
    from .commands import run

    try:
        run(args)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        sys.exit(0)
