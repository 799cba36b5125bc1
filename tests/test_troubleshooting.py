"""docs/troubleshooting.md covers the whole exception tree, and the example apps' messages.

Every subclass of ``AtsyncError`` that atsync defines — found by importing every module under
``src/atsync``, so a class added anywhere is seen — must be mentioned in the guide, written as
code (`` `RecordError` ``), so that a user who meets it can look it up. Every entry of the guide
gives the cause and the remedy (``*Fix:*``, or ``*Nothing to do:*`` and what happens next), and
every message the example apps show their user is in its section "The example apps".
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import pkgutil
import re
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


# -- every entry has a cause and a remedy ----------------------------------------------------------

FIX = "*Fix:*"
NOTHING = "*Nothing to do:*"


def _bullets(text: str) -> list[str]:
    """The page's top-level list items, each with its continuation lines joined by a space."""
    items: list[str] = []
    current: str | None = None
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced:
            continue
        if line.startswith("- "):
            if current is not None:
                items.append(current)
            current = line
        elif current is not None and line.startswith("  ") and line.strip():
            current += " " + line.strip()
        elif current is not None:
            items.append(current)
            current = None
    if current is not None:
        items.append(current)
    return items


def test_every_entry_gives_a_cause_and_a_remedy() -> None:
    """Each bullet reads "message — cause. *Fix:* remedy" (or "*Nothing to do:*" and what
    happens next): every bullet, the "- **`Class`**" ones and the "- `message`" ones alike."""
    bullets = _bullets(GUIDE.read_text(encoding="utf-8"))
    assert len(bullets) > 100  # the parser sees the page's lists
    assert sum(b.startswith("- **") for b in bullets) > 60
    bad = []
    for bullet in bullets:
        dash = bullet.find(" — ")
        marks = [i for i in (bullet.find(FIX), bullet.find(NOTHING)) if i != -1]
        if dash == -1 or not marks or min(marks) < dash:
            bad.append(bullet[:100])
    assert not bad, (
        f"these entries of docs/troubleshooting.md lack ' — <cause>' followed by '{FIX} <remedy>' "
        f"or '{NOTHING} <what happens next>': {bad}"
    )


def test_one_remedy_convention() -> None:
    """Only "*Fix:*" (capitalised, with its colon), not "*Fix* the …" or "*fix:*"."""
    text = GUIDE.read_text(encoding="utf-8")
    marks = re.findall(r"\*(?:[Ff]ix|[Nn]othing to do)\b[^*]*\*", text)
    stray = [mark for mark in marks if mark not in (FIX, NOTHING)]
    assert not stray, f"use {FIX} / {NOTHING} exactly: {stray}"


# -- the example apps' own messages are documented -------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_SOURCES = sorted([*(EXAMPLES / "notes").glob("*.py"), *(EXAMPLES / "vault").glob("*.py")])
# A vault report line that says a file was not synced or not written as asked.
_REPORT_TROUBLE = ("skipped", "cannot", "refused", "kept")


def _literal_parts(node: ast.expr) -> list[str] | None:
    """A string literal's text; an f-string's literal pieces (None: not a string literal)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        parts = [node.value]
    elif isinstance(node, ast.JoinedStr):
        parts = [v.value for v in node.values if isinstance(v, ast.Constant)]
    else:
        return None
    return [p for p in (" ".join(part.split()) for part in parts) if p]


def _is_stderr(call: ast.Call) -> bool:
    return any(kw.arg == "file" and ast.unparse(kw.value) == "sys.stderr" for kw in call.keywords)


def _user_messages(source: Path) -> list[tuple[str, list[str]]]:
    """(where, literal parts) of each message an example shows its user: ``SystemExit(...)``
    (the command ends with it), an ``OSError`` raised with a message (``vault.py`` prints it),
    ``print(..., file=sys.stderr)``, and ``report(...)`` lines that say a file was skipped,
    refused, kept or could not be handled."""
    found = []
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        parts = _literal_parts(node.args[0])
        if not parts:
            continue
        name = ast.unparse(node.func).rpartition(".")[2]
        builtin = getattr(builtins, name, None)
        user_facing = (
            name == "SystemExit"
            or (isinstance(builtin, type) and issubclass(builtin, OSError))
            or (name == "print" and _is_stderr(node))
            or (name == "report" and parts[0].startswith(_REPORT_TROUBLE))
        )
        if user_facing:
            found.append((f"{source.relative_to(EXAMPLES)}:{node.lineno}", parts))
    return found


def _example_section() -> str:
    text = GUIDE.read_text(encoding="utf-8")
    start = text.index("\n## The example apps\n")
    end = text.find("\n## ", start + 1)
    return " ".join(text[start : end if end != -1 else None].split())


def test_the_example_messages_are_found() -> None:
    messages = [parts for source in EXAMPLE_SOURCES for _, parts in _user_messages(source)]
    firsts = {parts[0] for parts in messages}
    # A check of the collector itself: one of each kind.
    assert "a shared note has a text only (no --body or --image)" in firsts  # SystemExit
    assert "refused:" in firsts  # print(..., file=sys.stderr)
    assert "the vault folder" in firsts  # an OSError vault.py prints
    assert "skipped" in firsts  # a report line
    assert len(messages) >= 12


def test_every_example_message_is_in_the_troubleshooting_guide() -> None:
    """Each literal piece of each message (an f-string's text between its fields) appears in
    the "The example apps" section, so a message added to an example must be documented."""
    section = _example_section()
    missing = [
        f"{where}: {part!r}"
        for source in EXAMPLE_SOURCES
        for where, parts in _user_messages(source)
        for part in parts
        if part not in section
    ]
    assert not missing, (
        "docs/troubleshooting.md, section 'The example apps', does not document these example "
        f"messages (add each with its cause and *Fix:*): {missing}"
    )
