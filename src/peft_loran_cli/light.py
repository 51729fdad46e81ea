"""The library's pure-Python modules, for the checks the command line makes before it imports torch.

``import peft_loran.activations`` would run the package's ``__init__``, which imports torch, transformers and PEFT
(seconds). The modules named here import only the standard library, so the command line loads each file on its
own: a user's mistake (an unknown activation, an ``--output-dir`` that may not be replaced) is answered in
milliseconds. Once ``peft_loran`` itself is imported, its own module objects are returned instead (they hold, for
example, activations a program registered).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

#: The library modules that import no torch at module level.
LIGHT_MODULES = ("activations", "atomic", "rank_spec")


def library_module(name: str) -> ModuleType:
    """``peft_loran.<name>`` (one of :data:`LIGHT_MODULES`): the package's own module once peft_loran is imported,
    else that file loaded on its own, without the package."""
    if name not in LIGHT_MODULES:
        raise ValueError(f"peft_loran.{name} is not one of the modules loadable without torch: {LIGHT_MODULES}")
    loaded = sys.modules.get(f"peft_loran.{name}")
    if loaded is not None:
        return loaded
    alias = f"peft_loran_cli._light_{name.strip('_')}"
    light = sys.modules.get(alias)
    if light is None:
        package = importlib.util.find_spec("peft_loran")  # finds the package without running its __init__
        spec = importlib.util.spec_from_file_location(alias, Path(package.origin).parent / f"{name}.py")
        light = importlib.util.module_from_spec(spec)
        sys.modules[alias] = light  # dataclasses look their module up while the file runs
        spec.loader.exec_module(light)
    return light
