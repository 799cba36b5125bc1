"""docs/troubleshooting.md covers the whole exception tree.

Every subclass of ``AtsyncError`` that atsync defines — found by importing every module under
``src/atsync``, so a class added anywhere is seen — must be mentioned in the guide, written as
code (`` `RecordError` ``), so that a user who meets it can look it up.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import atsync
from atsync._errors import AtsyncError

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "troubleshooting.md"


def _exception_classes() -> dict[str, type[AtsyncError]]:
    """Every ``AtsyncError`` subclass (and the base) defined in a module of atsync."""
    modules = [atsync] + [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(atsync.__path__, prefix="atsync.")
        if not info.name.endswith(".__main__")  # importing it would run the CLI
    ]
    found: dict[str, type[AtsyncError]] = {}
    for module in modules:
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, AtsyncError) and value.__module__.split(".")[0] == "atsync":
                found[value.__qualname__] = value
    # Subclasses defined where no module attribute names them (inside a function, say).
    todo = [AtsyncError]
    while todo:
        cls = todo.pop()
        if cls.__module__.split(".")[0] == "atsync":
            found.setdefault(cls.__qualname__, cls)
        todo.extend(cls.__subclasses__())
    return found


def test_the_tree_is_found() -> None:
    classes = _exception_classes()
    # The walk sees the whole documented tree (a sanity check of the walk itself).
    assert {"AtsyncError", "RecordError", "RateLimitedError", "DevPDSError"} <= set(classes)


def test_every_exception_class_is_in_the_troubleshooting_guide() -> None:
    text = GUIDE.read_text(encoding="utf-8")
    missing = sorted(name for name in _exception_classes() if f"`{name}`" not in text)
    assert not missing, (
        f"docs/troubleshooting.md does not mention {missing}: add where the user meets each, "
        "why, and what to do"
    )
