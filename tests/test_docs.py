"""The documentation stays true: guide examples run, every public name has a docstring.

Each page of ``docs/`` is one test: its ```python blocks run in order in one namespace,
in a temporary working directory. A block that needs what a test run cannot have (a GPU,
several processes, a data file) is skipped by putting this line right above it::

    <!-- docs-test: skip (the reason) -->
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import warnings
from pathlib import Path

import pytest
import torch

import torchbayes

DOCS = Path(__file__).resolve().parent.parent / "docs"
SKIP_MARKER = re.compile(r"<!--\s*docs-test:\s*skip\b.*?-->")
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)


def python_blocks(page: Path) -> list[tuple[int, str, bool]]:
    """``(line, code, skipped)`` for each ```python block of ``page``."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for match in BLOCK.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((line, match.group(1), bool(SKIP_MARKER.search(before))))
    return blocks


PAGES = sorted(page for page in DOCS.glob("*.md") if any(not skip for _, _, skip in python_blocks(page)))


def test_the_extractor_finds_blocks_and_skip_markers(tmp_path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```python\na = 1\n```\n\n<!-- docs-test: skip (needs a GPU) -->\n```python\nb = 2\n```\n"
                    "\n```bash\nls\n```\n", encoding="utf-8")
    assert python_blocks(page) == [(3, "a = 1\n", False), (8, "b = 2\n", True)]
    assert len(PAGES) >= 8  # the guides carry examples


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_guide_examples_run(page: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples may write files (checkpoints, reports)
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an example that warns is not what users should copy
        for line, code, skipped in python_blocks(page):
            if skipped:
                continue
            try:
                exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"docs/{page.name}, the block at line {line} failed: {error!r}") from error


# ------------------------------------------------------------------ docstrings
def public_modules() -> list[str]:
    names = ["torchbayes"]
    for info in pkgutil.walk_packages(torchbayes.__path__, "torchbayes."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def undocumented(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    missing = [] if inspect.getdoc(module) else [module_name]
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name)
        if inspect.ismodule(obj):
            continue
        if callable(obj) and not (obj.__doc__ or "").strip():
            missing.append(f"{module_name}.{name}")
        if inspect.isclass(obj) and obj.__module__.startswith("torchbayes"):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not callable(member) and not isinstance(member, (classmethod, property)):
                    continue
                function = member.__func__ if isinstance(member, classmethod) else member
                if not (inspect.getdoc(function) or "").strip():
                    missing.append(f"{module_name}.{name}.{attr}")
    return missing


def test_every_public_name_has_a_docstring() -> None:
    missing = [name for module in public_modules() for name in undocumented(module)]
    assert not missing, f"public names without a docstring: {missing}"
