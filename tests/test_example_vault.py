"""The vault example (examples/vault) against the real reference PDS: two devices of alice
keep a folder of Markdown files in step both ways (create, edit, rename, delete, front matter
kept, attachments byte-identical); the same lines edited on both leave one version in the file
and the other in ``NAME (conflict DEVICE DATE).md`` on both devices; edits to different lines
merge; a pulled change meeting an unscanned edit is merged, not overwritten; bob, following
alice, gets her vault read-only under ``@alice.test/``; the command line watches a folder
until interrupted. Each test uses record collections of its own (``--nsid``): the PDS is
shared by the whole run. The merge and front-matter functions are checked on their own too.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Any

import anyio
import pytest

from atsync.atproto import XrpcClient
from atsync.db import BlobRef
from atsync.lexicon import LexiconSet, validate_record
from pds_fixtures import ACCOUNTS

sys.path.insert(0, str(Path(__file__).parent.parent / "examples" / "vault"))

import vault as vault_cli
from vault_app import COPIES, VaultConflicts, lexicons, render, split_front
from vault_merge import Version, conflict_path, keep_local, merge_lines, resolve

EXAMPLE = Path(__file__).parent.parent / "examples" / "vault"
PASSWORDS = dict(ACCOUNTS)
TIMEOUT = 60


# -- helpers --------------------------------------------------------------------------------


def nsid_for(request: pytest.FixtureRequest) -> str:
    """Collections of the test's own: ``test.vault.<test name>.file`` and ``.attachment``."""
    name = "".join(c for c in request.node.name if c.isalnum()).lower()[:50]
    return f"test.vault.{name}"


class Device:
    """One device: a vault folder and its database, synced with ``vault.py --once`` run in
    this process (the same ``main`` the script runs)."""

    def __init__(
        self, home: Path, name: str, nsid: str, pds: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.name, self.nsid, self.pds, self.monkeypatch = name, nsid, pds, monkeypatch
        self.dir = home / name / "vault"
        self.dir.mkdir(parents=True)
        self.db = home / name / "vault.db"

    def argv(self, *extra: str) -> list[str]:
        return ["--db", str(self.db), "--dir", str(self.dir), "--device", self.name,
                "--nsid", self.nsid, *extra]  # fmt: skip

    def login_args(self, handle: str) -> list[str]:
        self.monkeypatch.setenv("ATSYNC_PASSWORD", PASSWORDS[handle])
        return ["--login", handle, "--service", self.pds.pds_url]

    def sync(self, *extra: str, login: str | None = None) -> str:
        """One ``--once`` round; returns what it printed."""
        args = self.argv("--once", "--timeout", str(TIMEOUT), *extra)
        if login is not None:
            args += self.login_args(login)
        out, err = StringIO(), StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = vault_cli.main(args)
        assert code == 0, (out.getvalue(), err.getvalue())
        assert "synced: 0 queued, 0 failed" in out.getvalue(), out.getvalue()
        return out.getvalue()

    def write(self, path: str, content: str | bytes) -> None:
        full = self.dir / path
        full.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.encode()
        full.write_bytes(content)

    def read(self, path: str) -> str:
        return (self.dir / path).read_text()

    def tree(self) -> dict[str, bytes]:
        """Every file of the vault (hidden ones left out), by path."""
        return {
            p.relative_to(self.dir).as_posix(): p.read_bytes()
            for p in sorted(self.dir.rglob("*"))
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(self.dir).parts)
        }


@pytest.fixture
def devices(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> tuple[Device, Device]:
    """Two devices of alice (``laptop`` and ``phone``), logged in and synced once."""
    monkeypatch.setenv("ATSYNC_PLC_URL", dev_pds.plc_url)
    nsid = nsid_for(request)
    laptop = Device(tmp_path, "laptop", nsid, dev_pds, monkeypatch)
    phone = Device(tmp_path, "phone", nsid, dev_pds, monkeypatch)
    laptop.sync(login="alice.test")
    phone.sync(login="alice.test")
    return laptop, phone


def records(pds: Any, handle: str, collection: str) -> dict[str, dict[str, Any]]:
    async def read() -> dict[str, dict[str, Any]]:
        async with XrpcClient(pds.pds_url) as client:
            did = pds.accounts[handle].did
            return {r.rkey: r.value async for r in client.iter_records(did, collection)}

    return anyio.run(read)


def by_path(found: dict[str, dict[str, Any]]) -> dict[str, tuple[str, dict[str, Any]]]:
    return {value["path"]: (rkey, value) for rkey, value in found.items()}


CONFLICT = re.compile(
    r"^(?P<stem>.+) \(conflict (?P<device>\S+) (?P<date>\d{4}-\d{2}-\d{2})\)\.md$"
)


def conflict_copies(tree: dict[str, bytes]) -> dict[str, bytes]:
    return {path: data for path, data in tree.items() if CONFLICT.match(path)}


# -- two devices of one account ------------------------------------------------------------


def test_create_edit_rename_and_delete_converge_both_ways(
    devices: tuple[Device, Device], dev_pds: Any
) -> None:
    laptop, phone = devices
    daily = "---\ntags: [daily]\ncreated: 2024-05-01\n---\n# Wednesday\n\n- [ ] write\n"
    laptop.write("Daily/2024-05-01.md", daily)
    laptop.write("Ideas.md", "no front matter here\n")
    laptop.write("Projects/Plan.md", "# Plan\n\n1. start\n")
    laptop.write(".obsidian/workspace.json", "{}")  # hidden: the editor's own state
    out = laptop.sync()
    assert {"created Daily/2024-05-01.md", "created Ideas.md", "created Projects/Plan.md"} <= set(
        out.splitlines()
    )

    phone.sync()
    assert phone.tree() == laptop.tree()
    assert set(phone.tree()) == {"Daily/2024-05-01.md", "Ideas.md", "Projects/Plan.md"}

    # On the PDS: one record per note, the front matter apart and verbatim, valid records.
    on_pds = by_path(records(dev_pds, "alice.test", f"{laptop.nsid}.file"))
    assert set(on_pds) == {"Daily/2024-05-01.md", "Ideas.md", "Projects/Plan.md"}
    assert on_pds["Daily/2024-05-01.md"][1]["front"] == "tags: [daily]\ncreated: 2024-05-01\n"
    assert on_pds["Daily/2024-05-01.md"][1]["body"] == "# Wednesday\n\n- [ ] write\n"
    assert "front" not in on_pds["Ideas.md"][1]
    assert on_pds["Ideas.md"][1]["device"] == "laptop"
    checked = LexiconSet(lexicons(laptop.nsid))
    for rkey, value in on_pds.values():
        validate_record(checked, f"{laptop.nsid}.file", value, rkey=rkey)
    plan_key = on_pds["Projects/Plan.md"][0]

    # The phone edits one note, renames another into a new folder, deletes a third.
    phone.write("Ideas.md", "no front matter here\nbut a second line\n")
    (phone.dir / "Archive").mkdir()
    (phone.dir / "Projects/Plan.md").rename(phone.dir / "Archive/Plan 2024.md")
    (phone.dir / "Daily/2024-05-01.md").unlink()
    out = phone.sync()
    assert "renamed Projects/Plan.md -> Archive/Plan 2024.md" in out
    assert "edited Ideas.md" in out and "deleted Daily/2024-05-01.md" in out

    out = laptop.sync()
    assert "moved Projects/Plan.md -> Archive/Plan 2024.md" in out
    assert (
        laptop.tree()
        == phone.tree()
        == {
            "Ideas.md": b"no front matter here\nbut a second line\n",
            "Archive/Plan 2024.md": b"# Plan\n\n1. start\n",
        }
    )
    assert not (laptop.dir / "Projects").exists() and not (laptop.dir / "Daily").exists()
    on_pds = by_path(records(dev_pds, "alice.test", f"{laptop.nsid}.file"))
    assert set(on_pds) == {"Ideas.md", "Archive/Plan 2024.md"}
    assert on_pds["Archive/Plan 2024.md"][0] == plan_key  # a rename keeps the record

    # And back the other way, front matter added on the laptop.
    laptop.write("Archive/Plan 2024.md", "---\nstatus: done\n---\n# Plan\n\n1. start\n2. ship\n")
    laptop.sync()
    out = phone.sync()
    assert "wrote Archive/Plan 2024.md" in out
    assert phone.tree() == laptop.tree()
    assert phone.read("Archive/Plan 2024.md").startswith("---\nstatus: done\n---\n# Plan")
    # Nothing echoes back: a further round on each changes nothing.
    assert "wrote" not in laptop.sync() and "edited" not in phone.sync()


def test_attachments_reach_the_other_device_byte_identical(
    devices: tuple[Device, Device], dev_pds: Any, request: pytest.FixtureRequest
) -> None:
    laptop, phone = devices
    # Bytes of this test's own: blobs are content-addressed and the PDS is shared.
    png = b"\x89PNG\r\n\x1a\n" + request.node.name.encode() + bytes(range(256)) * 400
    pdf = b"%PDF-1.7\n" + os.urandom(20_000)
    laptop.write("assets/cat.png", png)
    laptop.write("papers/paper.pdf", pdf)
    laptop.write("Cat.md", "![[cat.png]]\n")
    laptop.sync()

    phone.sync()
    assert (phone.dir / "assets/cat.png").read_bytes() == png
    assert (phone.dir / "papers/paper.pdf").read_bytes() == pdf
    on_pds = by_path(records(dev_pds, "alice.test", f"{laptop.nsid}.attachment"))
    assert on_pds["assets/cat.png"][1]["blob"]["mimeType"] == "image/png"
    assert on_pds["papers/paper.pdf"][1]["blob"]["size"] == len(pdf)

    # The phone replaces the image and deletes the PDF.
    png2 = png[::-1]
    phone.write("assets/cat.png", png2)
    (phone.dir / "papers/paper.pdf").unlink()
    phone.sync()
    laptop.sync()
    assert (laptop.dir / "assets/cat.png").read_bytes() == png2
    assert laptop.tree() == phone.tree() and set(laptop.tree()) == {"assets/cat.png", "Cat.md"}
    on_pds = by_path(records(dev_pds, "alice.test", f"{laptop.nsid}.attachment"))
    assert set(on_pds) == {"assets/cat.png"}


def test_the_same_lines_changed_on_both_devices_leave_a_conflict_copy(
    devices: tuple[Device, Device], dev_pds: Any
) -> None:
    laptop, phone = devices
    laptop.write("Shopping.md", "# Shopping\n- milk\n- eggs\n- bread\n")
    laptop.sync()
    phone.sync()
    # Both change the same line before either syncs.
    oat, soy = (f"# Shopping\n- {kind} milk\n- eggs\n- bread\n" for kind in ("oat", "soy"))
    laptop.write("Shopping.md", oat)
    phone.write("Shopping.md", soy)
    laptop.sync()  # the laptop's version reaches the PDS first

    out = phone.sync()  # the phone meets it: its own version stays, the laptop's goes beside
    copies = conflict_copies(phone.tree())
    assert len(copies) == 1, phone.tree()
    [(name, data)] = copies.items()
    match = CONFLICT.match(name)
    assert match is not None
    assert (match["stem"], match["device"]) == ("Shopping", "laptop")
    assert phone.read("Shopping.md") == soy and data == oat.encode()
    assert f"conflict in Shopping.md: the other version is in {name}" in out
    on_pds = by_path(records(dev_pds, "alice.test", f"{laptop.nsid}.file"))
    assert match["date"] == on_pds[name][1]["editedAt"][:10]  # the day of that version
    assert on_pds["Shopping.md"][1]["body"] == "# Shopping\n- soy milk\n- eggs\n- bread\n"

    laptop.sync()  # both files on both devices
    assert laptop.tree() == phone.tree()
    assert laptop.read("Shopping.md") == soy and (laptop.dir / name).read_bytes() == oat.encode()
    # Settled: another round on each makes no further copy.
    phone.sync()
    laptop.sync()
    assert laptop.tree() == phone.tree() and len(conflict_copies(laptop.tree())) == 1


def test_the_same_new_name_on_both_devices_keeps_both_files(
    devices: tuple[Device, Device], dev_pds: Any
) -> None:
    laptop, phone = devices
    laptop.write("Untitled.md", "the laptop's first note\n")
    laptop.write("Same.md", "typed the same on both\n")
    phone.write("Untitled.md", "the phone's first note\n")  # created later: a newer key
    phone.write("Same.md", "typed the same on both\n")
    laptop.sync()
    out = phone.sync()
    [(name, data)] = conflict_copies(phone.tree()).items()
    assert name.startswith("Untitled (conflict phone ") and data == b"the phone's first note\n"
    assert f"Untitled.md is taken: the newer file goes to {name}" in out
    laptop.sync()
    assert (
        laptop.tree()
        == phone.tree()
        == {
            "Untitled.md": b"the laptop's first note\n",
            name: b"the phone's first note\n",
            "Same.md": b"typed the same on both\n",
        }
    )
    on_pds = records(dev_pds, "alice.test", f"{laptop.nsid}.file")
    assert sorted(v["path"] for v in on_pds.values()) == sorted(["Untitled.md", name, "Same.md"])


def test_edits_to_different_lines_merge_and_the_keep_policy_can_be_replaced(
    devices: tuple[Device, Device],
) -> None:
    laptop, phone = devices
    laptop.write("Todo.md", "---\ntags: [todo]\n---\n- one\n- two\n- three\n- four\n- five\n")
    laptop.write("Title.md", "draft title\n")
    laptop.sync()
    phone.sync()
    laptop.write("Todo.md", "---\ntags: [todo, home]\n---\n- one\n- two\n- three\n- four\n- five\n")
    phone.write("Todo.md", "---\ntags: [todo]\n---\n- one\n- two\n- three\n- four\n- FIVE\n")
    laptop.write("Title.md", "the laptop's title\n")
    phone.write("Title.md", "the phone's title\n")
    laptop.sync()
    phone.sync("--keep", "remote")  # the phone lets the version already pushed stay
    laptop.sync()
    merged = "---\ntags: [todo, home]\n---\n- one\n- two\n- three\n- four\n- FIVE\n"
    assert laptop.read("Todo.md") == phone.read("Todo.md") == merged  # no copy: merged
    assert laptop.read("Title.md") == phone.read("Title.md") == "the laptop's title\n"
    assert laptop.tree() == phone.tree()
    [(name, data)] = conflict_copies(phone.tree()).items()
    assert name.startswith("Title (conflict phone ") and data == b"the phone's title\n"


def test_a_pulled_change_meeting_an_unscanned_edit_is_merged_not_overwritten(
    devices: tuple[Device, Device],
) -> None:
    laptop, phone = devices
    laptop.write("Log.md", "monday\ntuesday\nwednesday\nthursday\nfriday\n")
    laptop.sync()
    phone.sync()
    laptop.write("Log.md", "MONDAY\ntuesday\nwednesday\nthursday\nfriday\n")
    laptop.sync()

    lines: list[str] = []
    with vault_cli.open_device(
        phone.db, phone.dir, device="phone", nsid=phone.nsid, once=True, report=lines.append,
    ) as device:  # fmt: skip
        # Saved in the editor, not scanned yet, when the pull brings the laptop's edit.
        phone.write("Log.md", "monday\ntuesday\nwednesday\nthursday\nFRIDAY\n")
        device.sync.wait_pulled(timeout=TIMEOUT)
        applied = device.vault.apply()
        assert applied.written == [] and applied.waiting == 1  # the edit is not overwritten
        assert phone.read("Log.md").endswith("FRIDAY\n")
        scanned = device.vault.scan()
        assert scanned.edited == ["Log.md"]
        assert "edited Log.md (merged with a pull)" in lines
        assert device.vault.apply().written == ["Log.md"]
        device.sync.wait_for_idle(timeout=TIMEOUT)
    both = "MONDAY\ntuesday\nwednesday\nthursday\nFRIDAY\n"
    assert phone.read("Log.md") == both
    laptop.sync()
    assert laptop.read("Log.md") == both and laptop.tree() == phone.tree()


# -- a collaborator --------------------------------------------------------------------------


def test_a_follower_mirrors_the_vault_read_only(
    devices: tuple[Device, Device], dev_pds: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    laptop, _ = devices
    laptop.write("Recipes/Bread.md", "---\nserves: 4\n---\nflour, water, salt\n")
    laptop.write("Recipes/bread.jpg", b"\xff\xd8\xff" + b"crumb" * 300)
    laptop.sync()

    bob = Device(tmp_path, "bob", laptop.nsid, dev_pds, monkeypatch)
    bob.write("Mine.md", "bob's own note\n")
    bob.sync("--follow", "alice.test", login="bob.test")
    mirror = {p.removeprefix("@alice.test/"): d for p, d in bob.tree().items() if p != "Mine.md"}
    assert mirror == laptop.tree()
    assert set(bob.tree()) == {"Mine.md", "@alice.test/Recipes/Bread.md",
                               "@alice.test/Recipes/bread.jpg"}  # fmt: skip
    assert os.stat(bob.dir / "@alice.test/Recipes/Bread.md").st_mode & 0o222 == 0  # read-only

    # Bob's own note goes to his repository, not to alice's; an edit in the mirror goes nowhere.
    assert {v["path"] for v in records(dev_pds, "bob.test", f"{bob.nsid}.file").values()} == {
        "Mine.md"
    }
    mirrored = bob.dir / "@alice.test/Recipes/Bread.md"
    mirrored.chmod(0o644)
    mirrored.write_text("bob was here\n")
    bob.sync()  # following is remembered, and so is the mirror's name
    assert {v["path"] for v in records(dev_pds, "bob.test", f"{bob.nsid}.file").values()} == {
        "Mine.md"
    }
    alices = by_path(records(dev_pds, "alice.test", f"{laptop.nsid}.file"))
    assert alices["Recipes/Bread.md"][1]["body"] == "flour, water, salt\n"

    # Alice's changes reach the mirror: an edit (over bob's) and a delete.
    laptop.write("Recipes/Bread.md", "---\nserves: 6\n---\nflour, water, salt, yeast\n")
    (laptop.dir / "Recipes/bread.jpg").unlink()
    laptop.sync()
    bob.sync()
    assert mirrored.read_text() == "---\nserves: 6\n---\nflour, water, salt, yeast\n"
    assert not (bob.dir / "@alice.test/Recipes/bread.jpg").exists()


# -- the command line, as a user runs it ----------------------------------------------------


class Watcher:
    """``vault.py`` without ``--once``, in a process of its own; its output read line by
    line on a thread, so a test waits for what it prints."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLE / "vault.py"), *argv],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **env},
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, text: str, timeout: float = TIMEOUT) -> None:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {text!r} within {timeout} s; got {self.seen}") from None
            if line is None:
                raise AssertionError(f"exited before {text!r}; got {self.seen}")
            self.seen.append(line)
            if text in line:
                return

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=TIMEOUT)


def test_the_command_line_watches_the_folder_until_interrupted(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATSYNC_PLC_URL", dev_pds.plc_url)
    nsid = nsid_for(request)
    desk = Device(tmp_path, "desk", nsid, dev_pds, monkeypatch)
    phone = Device(tmp_path, "phone", nsid, dev_pds, monkeypatch)
    desk.write("Inbox.md", "written before the first start\n")
    env = {"ATSYNC_PLC_URL": dev_pds.plc_url, "ATSYNC_PASSWORD": PASSWORDS["alice.test"]}
    watcher = Watcher(desk.argv("--login", "alice.test", "--service", dev_pds.pds_url), env)
    try:
        watcher.expect(f"logged in as {dev_pds.accounts['alice.test'].did}")
        watcher.expect("watching")
        watcher.expect("created Inbox.md")
        watcher.expect("up to date")
        desk.write("Later.md", "saved while it watches\n")
        watcher.expect("created Later.md")
        watcher.expect("up to date")

        phone.sync(login="alice.test")
        assert phone.tree() == desk.tree()
        phone.write("From the phone.md", "hello desk\n")
        phone.sync()
        watcher.expect("wrote From the phone.md")  # pulled live, written at once
        assert (desk.dir / "From the phone.md").read_text() == "hello desk\n"
    finally:
        code = watcher.stop()
    watcher.expect("stopped")
    assert code == 0, watcher.seen


def test_the_command_line_refuses_a_missing_folder(tmp_path: Path) -> None:
    err = StringIO()
    with redirect_stderr(err):
        code = vault_cli.main(["--db", str(tmp_path / "v.db"), "--dir", str(tmp_path / "no")])
    assert code == 2 and "is not a folder" in err.getvalue()


# -- the pieces on their own ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "---\ntitle: x\n---\nbody\n",
        "---\n---\nempty front matter\n",
        "---\na: 1\n---\n",
        "no front matter\n---\nnot one either\n",
        "---\nnever closed\n",
        "---\n---",
        "",
        "\ufeff---\nBOM first: body only\n---\n",
        "---\r\nwindows: line ends stay in the body\r\n---\r\n",
    ],
)
def test_front_matter_splits_and_renders_back_exactly(text: str) -> None:
    front, body = split_front(text)
    assert render(front, body) == text


def test_front_matter_is_the_text_between_the_fences() -> None:
    assert split_front("---\ntags: [a]\n---\n# Hi\n") == ("tags: [a]\n", "# Hi\n")
    assert split_front("---\n---\nx") == ("", "x")
    assert split_front("# no\n") == (None, "# no\n")


def test_lines_merge_unless_the_same_lines_changed() -> None:
    base = "a\nb\nc\nd\ne\n"
    assert merge_lines(base, "A\nb\nc\nd\ne\n", "a\nb\nc\nd\nE\n") == "A\nb\nc\nd\nE\n"
    assert merge_lines(base, "a\nb\nc\nd\ne\nf\n", "a\nb\nC\nd\ne\n") == "a\nb\nC\nd\ne\nf\n"
    assert merge_lines(base, "b\nc\nd\ne\n", "a\nb\nc\nd\nE\n") == "b\nc\nd\nE\n"
    assert merge_lines(base, "a\nX\nc\nd\ne\n", "a\nY\nc\nd\ne\n") is None  # same line
    assert merge_lines(base, "a\nX\nc\nd\ne\n", "a\nb\nY\nd\ne\n") is None  # adjacent lines
    assert merge_lines(base, "a\nX\nc\nd\ne\n", "a\nX\nc\nd\ne\n") == "a\nX\nc\nd\ne\n"
    assert merge_lines("", "new\n", "other\n") is None


def test_resolve_keeps_one_version_and_returns_the_other() -> None:
    local = Version("n.md", "mine\n", "phone", "2024-05-02T10:00:00.000Z")
    remote = Version("n.md", "theirs\n", "laptop", "2024-05-01T10:00:00.000Z")
    kept = resolve("base\n", local, remote, keep_local)
    assert (kept.content, kept.kept, kept.copy) == ("mine\n", "local", remote)
    other = resolve("base\n", local, remote, lambda mine, theirs: "remote")
    assert (other.content, other.copy) == ("theirs\n", local)
    assert resolve("mine\n", local, remote, keep_local).copy is None  # only remote changed
    with pytest.raises(ValueError, match="keep policy"):
        resolve("base\n", local, remote, lambda mine, theirs: "both")  # type: ignore[arg-type,return-value]


def test_conflict_copies_are_named_after_the_other_device_and_day() -> None:
    version = Version("Notes/Plan.md", "x", "my laptop", "2024-05-01T23:59:00.000Z")
    assert conflict_path("Notes/Plan.md", version, lambda p: False) == (
        "Notes/Plan (conflict my-laptop 2024-05-01).md"
    )
    taken = {"Plan (conflict my-laptop 2024-05-01).md"}
    assert conflict_path("Plan.md", version, taken.__contains__) == (
        "Plan (conflict my-laptop 2024-05-01 2).md"
    )
    assert conflict_path("README", version, lambda p: False) == (
        "README (conflict my-laptop 2024-05-01)"
    )


def test_the_row_policy_merges_fields_and_queues_the_losing_version() -> None:
    base = {"id": "k", "path": "a.md", "front": None, "body": "x\n", "device": "phone",
            "editedAt": "2024-05-01T00:00:00.000Z"}  # fmt: skip
    local = {**base, "body": "mine\n", "editedAt": "2024-05-02T00:00:00.000Z"}
    remote = {**base, "path": "b.md", "body": "theirs\n", "device": "laptop",
              "editedAt": "2024-05-03T00:00:00.000Z"}  # fmt: skip
    waiting = [{"path": "a.md", "content": "older\n", "device": "x", "editedAt": ""}]
    policy = VaultConflicts(current=lambda model, key: {"id": key, COPIES: waiting})
    merged = policy(base, local, remote)
    assert merged is not None
    assert (merged["path"], merged["body"], merged["device"]) == ("b.md", "mine\n", "phone")
    assert merged[COPIES] == [*waiting, Version("b.md", "theirs\n", "laptop",
                                                remote["editedAt"]).to_json()]  # fmt: skip
    assert policy(base, None, remote) == remote  # an edit beats a delete
    assert policy(base, local, None) == local

    # An attachment's pulled version stays; this device's goes beside it.
    ref = BlobRef("bafkreimine", "image/png", 3)
    theirs = BlobRef("bafkreitheirs", "image/png", 4)
    att = {"id": "k", "path": "c.png", "blob": ref, "device": "phone", "editedAt": ""}
    merged = VaultConflicts()(None, att, {**att, "blob": theirs, "device": "laptop"})
    assert merged is not None and merged["blob"] == theirs
    assert merged[COPIES][0]["content"] == ref.to_json()


def test_the_readme_session_runs_as_written(make_pds: Any, tmp_path: Path) -> None:
    pds = make_pds(accounts=[("alice.test", "pw1")])
    blocks = re.findall(r"^```\n(.*?)^```", (EXAMPLE / "README.md").read_text(), flags=re.M | re.S)
    (session,) = [b for b in blocks if "--once" in b and "mktemp" in b]
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", session],
        cwd=EXAMPLE.parent.parent,  # "from the repository's root"
        env={**os.environ, "PDS": pds.pds_url, "PLC": pds.plc_url, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "# Shopping" in lines  # `cat` on the laptop
    assert "- eggs" in lines
    assert lines[-1] == "Groceries.md", done.stdout  # `ls phone`: the rename arrived
    (scratch,) = [p for p in tmp_path.iterdir() if (p / "phone").is_dir()]
    assert sorted(p.name for p in (scratch / "phone").iterdir()) == ["Groceries.md"]
    assert (scratch / "phone" / "Groceries.md").read_text() == "# Shopping\n\n- eggs\n"
