"""Training one run for the command line, on transformers' Trainer (each in its own process for comparisons).

Every method in a comparison gets the same model, data order (Trainer's seeded sampler), seed, rank, alpha,
dropout, targets, step budget and learning rate; only the adapter type differs.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from .data import TaskData
from .encoding import Encoded, collate
from .errors import UserError
from .evaluation import evaluate
from .loading import BaseLoading, cap_max_length, load_base, needs_tokenizer
from .memory import peak_memory, reset_peak_memory
from .methods import peft_config
from .records import write_model_card, write_task_record
from .settings import RunResult, Settings


#: In a training process started by :func:`train_isolated`: a file it creates once training is done (evaluating and
#: saving left). A file, not a multiprocessing Event: an Event's semaphore outlives a Ctrl-C'd command and makes
#: Python's resource tracker warn about a leaked semaphore at exit.
_TRAINED: Optional[str] = None


def quiet_child(quiet: bool, trained: Optional[str] = None, parent_pid: Optional[int] = None) -> None:
    """Initializer of the processes that train one run each (before they import peft_loran, PEFT or bitsandbytes):
    the same quiet as the command; Ctrl-C is the command's to handle (the process would print a traceback of its
    own); and the process ends when the command that started it is killed (otherwise it would train on, orphaned).
    ``parent_pid`` is the command's pid as the command saw it: a command killed while this process was still
    starting is noticed too (the process's parent is then already another one)."""
    global _TRAINED
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _no_multiprocessing_lock_for_progress_bars()
    _TRAINED = trained
    _exit_with_parent(parent_pid or os.getppid())
    quiet_libraries(quiet)


def _no_multiprocessing_lock_for_progress_bars() -> None:
    """tqdm guards its bars with a multiprocessing lock, a semaphore that a run stopped by Ctrl-C (terminated) leaves
    registered, and Python's resource tracker then warns about a "leaked semaphore"; this process writes its bars
    alone, so tqdm's thread lock is enough (tqdm skips the multiprocessing lock when ``mp_lock`` is set)."""
    try:
        from tqdm.std import TqdmDefaultWriteLock
    except ImportError:
        return
    TqdmDefaultWriteLock.mp_lock = None


def _exit_with_parent(parent: int) -> None:
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(143)  # the parent is gone: nobody will read this run's result

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def quiet_libraries(quiet: bool = False) -> None:
    """Keep the command line's log concise (library notices: :func:`peft_loran_cli.quiet_library_notices`;
    deprecation warnings meant for library developers); ``--quiet``: the result only, no progress bars."""
    import warnings

    from . import quiet_library_notices

    quiet_library_notices()
    # deprecation notices inside transformers/PEFT/torch are for their developers, not for users of this program
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if quiet:  # --quiet: the result only (no load/save progress bars, no library warnings)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("always", message="peft-loran:")  # our own (a kernel that failed to compile) stay



def train(method: str, task: TaskData, settings: Settings, model_path: str, save_to: Optional[Path]) -> RunResult:
    """Fine-tune one method on ``task.train`` and evaluate on ``task.test``; save the adapter to ``save_to``."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(settings.seed)
    loading = BaseLoading("nf4" if settings.load_in_4bit else None)
    model, tokenizer = load_base(model_path, task.kind, task.labels, loading, settings.gradient_checkpointing)
    needs_tokenizer(tokenizer, model_path)
    cap_max_length(settings, model)
    config = peft_config(method, settings, task.kind, model.config.model_type)
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"{method}: {str(exc).splitlines()[0]}") from None
    paired_init(model, settings.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_set = Encoded(task.train, tokenizer, task.kind, settings.max_length)
    with tempfile.TemporaryDirectory(prefix="peft-loran-trainer-") as scratch:  # we save adapters ourselves
        budget = (dict(num_train_epochs=settings.epochs, max_steps=-1) if settings.epochs
                  else dict(max_steps=settings.steps))
        steps = settings.steps if not settings.epochs else max(1, int(
            settings.epochs * len(train_set) / (settings.batch_size * settings.grad_accum)))
        args = TrainingArguments(
            output_dir=scratch, **budget, per_device_train_batch_size=settings.batch_size,
            gradient_accumulation_steps=settings.grad_accum, learning_rate=settings.lr, seed=settings.seed,
            data_seed=settings.seed, logging_steps=logging_interval(steps), save_strategy="no", report_to=[],
            disable_tqdm=settings.quiet, bf16=settings.bf16, lr_scheduler_type="linear", warmup_steps=0,
            use_cpu=not torch.cuda.is_available(),  # else bf16 on a CPU-only machine is refused with a traceback
            gradient_checkpointing=settings.gradient_checkpointing, remove_unused_columns=False,
            dataloader_num_workers=0, log_level="error",
            dataloader_pin_memory=torch.cuda.is_available(),  # pinning is for GPU transfers; on CPU it only warns
        )
        trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collate(tokenizer))
        _keep_progress_bar_only(trainer, settings.quiet)
        before = reset_peak_memory()
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        peak, kind = peak_memory()
    if _TRAINED is not None:  # tell the command (train_isolated) that only evaluating and saving are left
        Path(_TRAINED).touch()
    curve = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    model.eval()
    metrics = evaluate(model, tokenizer, task, settings)
    from peft_loran.diagnostics import summarize, update_statistics

    stats = update_statistics(model)
    summary = summarize(stats)
    if save_to is not None:
        model.save_pretrained(save_to)
        tokenizer.save_pretrained(save_to)
        write_task_record(save_to, task, settings, model_path, loading.as_record())
        write_model_card(save_to, method, config, task, settings, model_path, metrics)
    return RunResult(method, metrics, trainable, seconds, peak - before, kind, curve, stats,
                     summary["nonlinear_share"], summary["nonlinear_beyond_scale"], summary["effective_rank_mean"])


def paired_init(model, seed: int) -> None:
    """Draw every adapted module's ``A`` from a generator seeded by ``seed`` and the module's name, with LoRA's
    initialisation (Kaiming uniform, a = sqrt(5)). PEFT's LoRA draws more random numbers while building its layers
    than LoRAN does, so the same global seed alone gives them different ``A``; with this, every method of a
    comparison cell starts from the same ``A`` (and ``B = 0``), and the Trainer, which re-seeds when it is built,
    gives them the same data order and dropout masks: a paired difference then isolates the method."""
    import hashlib

    for name, module in model.named_modules():
        for attribute in ("lora_A", "loran_A", "hira_A"):
            factors = getattr(module, attribute, None)
            if not isinstance(factors, torch.nn.ModuleDict | torch.nn.ParameterDict) or "default" not in factors:
                continue
            A = factors["default"]
            A = A.weight if isinstance(A, torch.nn.Linear) else A
            digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            bound = 1.0 / math.sqrt(A.shape[1])  # kaiming_uniform_(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
            with torch.no_grad():
                A.copy_(torch.empty(A.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator))


def logging_interval(steps: int) -> int:
    """About 30 points on the loss curve, at an interval that divides ``steps`` so the last step is logged too."""
    target = max(1, steps // 30)
    return max(d for d in range(1, target + 1) if steps % d == 0)




class InterruptedAfterRun(KeyboardInterrupt):
    """Ctrl-C came after the run in progress had finished training; its result (evaluated and saved) is kept."""

    def __init__(self, result: "RunResult") -> None:
        super().__init__()
        self.result = result


def train_isolated(method: str, task: TaskData, settings: Settings, model_path: str,
                   save_to: Optional[Path]) -> RunResult:
    """:func:`train` in a fresh process, so every method of a comparison starts from the same memory state and
    its peak memory is its own. Errors come back as usual. Ctrl-C stops the run at once, unless it has finished
    training: then it is evaluated and saved first and comes back as :class:`InterruptedAfterRun` (a second Ctrl-C
    stops it at once). One process and a pipe, nothing else: a process pool's queues hold semaphores, which a
    Ctrl-C'd command leaves for Python's resource tracker to warn about."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    flags = tempfile.TemporaryDirectory(prefix="peft-loran-run-")
    trained = Path(flags.name) / "trained"
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_run_in_child, name="peft-loran-run", args=(
        sender, (settings.quiet, str(trained), os.getpid()), (method, task, settings, model_path, save_to)))
    process.start()
    sender.close()  # the child's copy is the only writer left: its exit ends the pipe
    try:
        try:
            return _result_of(receiver, process)
        except KeyboardInterrupt:
            if not trained.exists():
                raise
            print("\ninterrupted: the run in progress has finished training; evaluating and saving it (Ctrl-C again "
                  "to stop now)", file=sys.stderr, flush=True)
            raise InterruptedAfterRun(_result_of(receiver, process)) from None
    except KeyboardInterrupt:
        process.terminate()  # stop the run now, not when it is done
        raise
    finally:
        process.join()
        receiver.close()
        flags.cleanup()


def _run_in_child(sender, child_args: tuple, train_args: tuple) -> None:
    """The training process: :func:`train`'s result, or the exception it raised, sent back through the pipe."""
    quiet_child(*child_args)
    try:
        outcome = ("result", train(*train_args))
    except BaseException as exc:  # the command raises it as its own (a UserError becomes its `error:` line)
        if not isinstance(exc, UserError):  # a bug's traceback shows where in the training process it happened
            import traceback

            exc.add_note("".join(["\nin the training process:\n", *traceback.format_tb(exc.__traceback__)]))
        outcome = ("error", exc)
    try:
        sender.send(outcome)
    except Exception as exc:  # an exception that cannot be pickled: its text still reaches the command
        sender.send(("error", RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]} ({exc})")))
    finally:
        sender.close()


def _result_of(receiver, process) -> RunResult:
    try:
        kind, value = receiver.recv()
    except EOFError:  # the process ended without a word: killed (out of memory?) or crashed in native code
        process.join()
        raise RuntimeError(f"the training process ended without a result (exit code {process.exitcode}); if it "
                           "was killed for memory, try a smaller --batch-size or --max-length") from None
    if kind == "error":
        raise value
    return value


def _keep_progress_bar_only(trainer, quiet: bool) -> None:
    """Trainer prints every logged dict; keep its progress bar (unless quiet) and record the losses silently."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class ProgressBarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            return None

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not quiet:
        trainer.add_callback(ProgressBarOnly)
