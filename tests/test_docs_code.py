"""The code in docs/*.md runs as written and does what the guide says (README.md: test_readme.py).

For each guide in ``DOCS``, its fenced blocks are run in document order, as a reader copying
them would, in one fresh Python process per guide whose working directory is an empty
temporary directory:

- every ```python block runs in one namespace shared by the whole guide; top-level ``await``
  is allowed (the blocks run on one event loop kept for the whole guide, as in
  ``python -m asyncio`` or a notebook);
- in a plain ``` block, each line starting with ``$ `` is a shell command (a command goes on
  while a quote is open or a line ends in ``\\``), run at its place in the guide in the same
  directory with the virtualenv's ``bin`` first on ``PATH``. It must exit 0 — unless the
  output the guide shows starts with ``Error``: then it must fail with that message. The lines
  the guide shows after a command are its output, checked line by line (``…`` matches
  anything). A command that runs until stopped (``atsync dev-pds``) is named in its guide's
  ``background``: it is started, the guide goes on once it printed its first line (checked
  against the one the guide shows), and after the guide's last block it is stopped with
  SIGTERM, and must exit 0;
- other blocks (schemas, trees, JSON, output samples) are not run; where cheap, a test below
  checks them against reality.

What a guide assumes but does not say (a running PDS, its test account's password) comes from
its ``Doc`` entry below: a ``prelude`` run before the guide's first block, environment
variables, and an explicit table of ``substitutions`` of the guide's text (e.g. its example
handle by the dev PDS's); ``{pds_url}``, ``{plc_url}`` and ``{did_<name>}`` in them stand for
the PDS's. A guide that opens the system browser (``login_oauth``, ``atsync login --oauth``)
gets ``$BROWSER``, which Python's ``webbrowser`` runs: headless chromium signing in on the PDS's
page with the password in its ``env`` and clicking Authorize (tests/oauth_browser.py).
Everything else is the guide's own text. What the guide states as results (in its
comments, or output it shows) is asserted by ``after`` checks (run right after a given block,
in the guide's namespace; ``_`` holds a block's last expression value, as at the interactive
prompt, or what a command printed), ``checks`` (after the last block, and after a
``background`` command stopped), ``stdout`` (all the Python code prints) and
``afterwards`` (in this process, on the guide's working directory). Guides without code to
run have tests of their own at the end, where what they show can be checked cheaply.

Adding a guide: an entry in ``DOCS`` (``Doc()`` if it needs nothing), taken out of ``PENDING``.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import inspect
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from oauth_browser import PASSWORD_VARIABLE, browser_command

ROOT = Path(__file__).resolve().parent.parent
DOCS_DIR = ROOT / "docs"
BIN = Path(sys.executable).parent  # the virtualenv's: `atsync` is there

# Guides whose code is not run here, and why.
EXEMPT = {"real-pds.md": "needs a real Bluesky account and the internet (the issue exempts it)"}
# Guides other people are editing in this pass; each becomes a line of DOCS once they are done.
PENDING: tuple[str, ...] = ()

# Blocks whose `$ ` lines are commands; ```text (or json, sql…) blocks are never run.
SHELL_BLOCKS = ("", "sh", "shell", "console")
DOC_TIMEOUT = 120  # seconds for one guide, PDS round trips included
COMMAND_TIMEOUT = 60


# -- reading a guide --------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    kind: Literal["python", "shell"]
    line: int  # where the code starts in the guide (1-based)
    code: str
    output: tuple[str, ...] = ()  # shell: the lines the guide shows after the command


def _command_is_complete(command: str) -> bool:
    if command.endswith("\\"):
        return False
    try:
        shlex.split(command, comments=True)  # a quote in a comment opens nothing
    except ValueError:  # a quote still open: the command goes on on the next line
        return False
    return True


def _shell_steps(lines: list[str], first: int) -> list[Step]:
    steps: list[Step] = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            i += 1
            continue
        start, command = i, lines[i][2:]
        while not _command_is_complete(command) and i + 1 < len(lines):
            i += 1
            command += "\n" + lines[i]
        i += 1
        output = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i].rstrip())
            i += 1
        while output and not output[-1]:
            output.pop()
        steps.append(Step("shell", first + start, command, tuple(output)))
    return steps


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(info string, line of the first code line, code lines) of every fenced block."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            blocks.append((lines[i][3:].strip(), i + 2, lines[i + 1 : end]))
            i = end
        i += 1
    return blocks


def read_steps(text: str) -> list[Step]:
    """The guide's runnable code, in order: python blocks and ``$`` commands."""
    steps: list[Step] = []
    for info, first, body in fenced_blocks(text):
        if info == "python":
            steps.append(Step("python", first, "\n".join(body) + "\n"))
        elif info in SHELL_BLOCKS:
            steps.extend(_shell_steps(body, first))
    return steps


def plain_blocks(text: str) -> list[str]:
    return ["\n".join(body) for info, _, body in fenced_blocks(text) if info == ""]


# -- what each guide assumes ------------------------------------------------------------------


@dataclass(frozen=True)
class Doc:
    prelude: str = ""  # Python run before the guide's code, in its namespace
    substitutions: tuple[tuple[str, str], ...] = ()  # (text of the guide, what runs instead)
    checks: str = ""  # Python run after the guide's code, in its namespace
    # Python run right after the block that holds the key (a piece of the guide's code).
    after: Mapping[str, str] = field(default_factory=dict)
    stdout: tuple[str, ...] | None = None  # all the guide's Python code prints (… matches)
    env: Mapping[str, str] = field(default_factory=dict)
    # A PDS: None, "shared" (the session's dev_pds: for guides that only read), or the
    # accounts of a PDS of the guide's own (make_pds: for guides that write).
    pds: Literal["shared"] | tuple[tuple[str, str], ...] | None = None
    setup: Callable[[Any], None] | None = None  # called with the PDS before the guide runs
    # Called with the guide's text and its working directory after it ran: for what a guide
    # shows but does not run (a schema, a list of tables).
    afterwards: Callable[[str, Path], None] | None = None
    # Commands (by their start) that run until stopped: started in the background, stopped
    # with SIGTERM after the guide's last block (see the module's docstring).
    background: tuple[str, ...] = ()
    # The guide starts PDSes of its own (`atsync dev-pds`, `DevPDS`): the install is made
    # first (its progress shown), and the test carries the pds marker.
    starts_pds: bool = False
    # The guide opens the system browser: $BROWSER signs in with env[PASSWORD_VARIABLE].
    browser: bool = False

    @staticmethod
    def render(template: str, context: Mapping[str, str]) -> str:
        """``template`` with each ``{name}`` of ``context`` (the PDS's URLs and DIDs)
        replaced; other braces are left as they are."""
        return re.sub(r"\{(\w+)\}", lambda m: context.get(m[1], m[0]), template)


# -- the context the guides assume -------------------------------------------------------------

# The reader's app password for their account: here the dev PDS account's password.
APP_PASSWORD = 'app_password = "alice-app-pw"\n'
ALICE = (("alice.test", "alice-app-pw"),)
# alice.example.com's PDS is found through DNS and plc.directory; the dev PDS's account is on
# loopback, so the guides' login takes its address as `service=`.
LOGIN = (
    'signer.login("alice.example.com", app_password)',
    'signer.login("alice.test", app_password, service="{pds_url}")',
)
LOGIN_ASYNC = (
    'await signer.login_async("alice.example.com", app_password)',
    'await signer.login_async("alice.test", app_password, service="{pds_url}")',
)
# Pulls check each commit's signature against the account's key from its DID document: the
# dev PDS's DID documents are on its own PLC directory (docs/pull.md: $ATSYNC_PLC_URL).
DEV_PLC = {"ATSYNC_PLC_URL": "{plc_url}"}
# What identity.md says to use against the dev PDS (its § Options).
DEV_RESOLVER = (
    "IdentityResolver(plc_url=pds.plc_url, use_dns=False, allow_test_handles=True, "
    "web_origin=lambda host: pds.pds_url)"
)
PHONE_RKEY = "3lphone22222a"  # pull.md: the note written on another device
DAN_RKEY = "3ldan2222222a"  # collaborators.md: the note of the person followed


# dev-pds.md's shell commands work on the reader's app: its database, notes.db, with a note
# not pushed yet, and the module `atsync pull --app notes_app` imports.
NOTES_APP = """\
from atsync import Binding, Contract

contract = Contract(models={"notes": {"id": "primary", "title": "string"}})
bindings = {"notes": Binding("com.example.notes.note")}


@contract.action
def add_note(ctx, title):
    ctx.db.set("notes", {"id": ctx.tid(), "title": title})
"""
AN_APP_WITH_A_NOTE = f"""
from pathlib import Path

def _an_app_with_a_note():
    from atsync import App, ATSync, Manual

    Path("notes_app.py").write_text({NOTES_APP!r})
    notes_app = {{}}
    exec(Path("notes_app.py").read_text(), notes_app)
    with App.open("notes.db", notes_app["contract"]) as app:
        sync = ATSync(app, bindings=notes_app["bindings"], push=Manual(), pull=Manual())
        app.actions.add_note("written offline")
        sync.close()

_an_app_with_a_note()
"""
# What oauth.md says resolves the dev PDS's handles in Python (its § The development PDS).
OAUTH_DEV_RESOLVER = (
    'IdentityResolver(web_origin=lambda host: "{pds_url}", allow_test_handles=True, '
    'allow_insecure_localhost=True, plc_url="{plc_url}")'
)


def write_note(pds: Any, handle: str, rkey: str, title: str) -> None:
    from atsync.atproto import BlockingXrpcClient, Portal, blocking_login

    with Portal() as portal:
        password = pds.accounts[handle].password
        session = blocking_login(handle, password, pds.pds_url, portal=portal)  # in memory
        with BlockingXrpcClient(session=session, portal=portal) as client:
            note = {"$type": "com.example.notes.note", "title": title}
            client.create_record(session.did, "com.example.notes.note", note, rkey=rkey)


def a_note_from_the_phone(pds: Any) -> None:
    """pull.md's context: the account's repository already holds a note, written elsewhere."""
    write_note(pds, "alice.test", PHONE_RKEY, "from the phone")


def dan_has_a_note(pds: Any) -> None:
    """collaborators.md's context: the person followed has written a note."""
    write_note(pds, "dan.test", DAN_RKEY, "dan's note")


# -- what guides show but do not run, checked after they ran ------------------------------------


def _sql(text: str) -> str:
    return re.sub(r"\s+", " ", text).replace("( ", "(").replace(" )", ")").strip()


def raw_sql_tables_are_the_real_ones(text: str, work: Path) -> None:
    """The CREATE statements raw-sql.md shows are the ones SQLite stores, and its tables of
    atsync's own tables name every one the database has."""
    with contextlib.closing(sqlite3.connect(work / "notes.db")) as db:
        stored = dict(db.execute("select name, sql from sqlite_master where sql is not null"))
        tables = {n for (n,) in db.execute("select name from sqlite_master where type = 'table'")}
    shown = next(b for b in plain_blocks(text) if b.startswith("CREATE TABLE"))
    statements = [_sql(s) for s in re.split(r"\n(?=CREATE )", shown.strip())]
    for statement in statements:
        name = re.search(r'^CREATE \w+ "(\w+)"', statement)
        assert name is not None, statement
        assert _sql(stored[name[1]]) == statement, (stored[name[1]], statement)
    assert {s.split('"')[1] for s in statements} == {
        n for n in stored if n == "notes" or n.startswith("notes__")
    }
    ours = {n for n in tables if n.startswith("_atsync_")}
    documented = set(re.findall(r"^\| `(_atsync_\w+)` \|", text, re.M))
    assert documented == ours, (sorted(ours - documented), sorted(documented - ours))


def status_fields_are_the_real_ones(text: str, work: Path) -> None:
    """status.md's table names every field of SyncStatus, and the values of State and
    WaitReason."""
    from atsync.sync import State, SyncStatus, WaitReason

    table = text[text.index("| field |") :]
    table = table[: table.index("\n\n")]
    shown = set()
    for row in table.splitlines()[2:]:
        shown |= set(re.findall(r"`(\w+)`", row.split("|")[1]))
    assert shown == {f.name for f in dataclasses.fields(SyncStatus)}
    states = re.search(r"\| `state` \|(.*)", table)
    reasons = re.search(r"\| `waiting_reason` \|(.*)", table)
    assert states is not None and reasons is not None
    assert set(re.findall(r"`(\w+)`", states[1])) - {"State"} == {s.value for s in State}
    shown_reasons = set(re.findall(r"`(\w+)`", reasons[1])) - {"WaitReason"}
    assert shown_reasons == {r.value for r in WaitReason}


# -- the guides -------------------------------------------------------------------------------

DOCS: dict[str, Doc] = {
    "actions.md": Doc(
        checks="""
from atsync import ActionResult
# `result = app.actions.create_note("hello")   # ActionResult(id=..., result=key)`
assert isinstance(result, ActionResult), result
assert app.db.get("notes", result.result) == {"id": result.result, "title": "hello"}
assert app.log.get(result.id).name == "create_note"
# The batch committed both of its actions.
assert [n["title"] for n in app.db.query("notes", order_by="id")] == ["hello", "a", "b"]
""",
    ),
    "api.md": Doc(),  # the import line; what the prose names: test_api_md_names_…
    "blobs.md": Doc(
        prelude="""
from pathlib import Path
Path("harbour.jpg").write_bytes(b"\\xff\\xd8" + bytes(range(256)) * 40)  # the reader's photo
""",
        checks="""
import base64, hashlib, json, sqlite3
from pathlib import Path
from atsync import NotFoundError
from atsync.db import BlobRef

photo = Path("harbour.jpg").read_bytes()
ref = note["image"]
assert data == photo
assert isinstance(ref, BlobRef) and (ref.mime_type, ref.size) == ("image/jpeg", len(photo)), ref
def raw_cid(data):  # CIDv1, raw codec, sha2-256: the CID a PDS gives the same bytes
    cid = bytes([0x01, 0x55, 0x12, 0x20]) + hashlib.sha256(data).digest()
    return "b" + base64.b32encode(cid).decode().lower().rstrip("=")
assert ref.cid == raw_cid(photo), ref
# The store: <database>.blobs/<cid>; the same bytes again are stored once.
assert Path("notes.db.blobs", ref.cid).read_bytes() == photo
assert app.blobs.put(photo, "image/jpeg") == ref
assert [p.name for p in Path("notes.db.blobs").iterdir()] == [ref.cid]
# A blob not in the store: read raises NotFoundError, has says False, size None.
elsewhere = BlobRef(raw_cid(b"not here"), "image/png", 8)
assert not app.blobs.has(elsewhere) and app.blobs.size(elsewhere) is None
try:
    app.blobs.read(elsewhere)
    raise AssertionError("read a blob that is not in the store")
except NotFoundError:
    pass
# § In a record: the queued record holds the blob object.
with sqlite3.connect("notes.db") as db:
    ((record,),) = db.execute("select record from _atsync_outbox").fetchall()
image = {"$type": "blob", "ref": {"$link": ref.cid}, "mimeType": "image/jpeg", "size": len(photo)}
assert json.loads(record) == {"$type": "com.example.note", "text": "the harbour", "image": image}
""",
    ),
    "collaborators.md": Doc(
        pds=(*ALICE, ("dan.test", "dan-pw"), ("bob.test", "bob-pw"), ("carol.test", "carol-pw")),
        setup=dan_has_a_note,
        # The reader's password, and the DIDs of the people they share a collection with.
        prelude=APP_PASSWORD + 'bob_did, carol_did = "{did_bob}", "{did_carol}"\n',
        substitutions=(LOGIN_ASYNC,),
        env=DEV_PLC,
        after={
            "await sync.follow(": f"""
from atsync.sync import Origin
assert did == "{{did_dan}}"
assert key == "at://{{did_dan}}/com.example.notes.note/{DAN_RKEY}", key
assert origin == Origin("{{did_dan}}", key, origin.cid) and origin.cid, origin
assert sync.following == [] and app.db.query("notes") == []  # unfollowed: its rows are gone
""",
            'edit_doc("d1"': r"""
import json, re, sqlite3
with sqlite3.connect("docs.db") as db:
    queued = db.execute("select op, rkey, record from _atsync_outbox").fetchall()
assert [(op, rkey) for op, rkey, _ in queued] == [("create", "d1")], queued
record = json.loads(queued[0][2])
assert record["title"] == "…" and "body" not in record, record
assert list(record["syncClocks"]) == ["title"], record
# The stamp: 14 digits of milliseconds, a dot, a 5-digit counter, `/`, the writer's DID.
assert re.fullmatch(r"\d{14}\.\d{5}/did:\S+", record["syncClocks"]["title"]), record
""",
        },
    ),
    "dev-pds.md": Doc(
        starts_pds=True,
        background=("atsync dev-pds",),
        browser=True,
        prelude=AN_APP_WITH_A_NOTE,
        # The default account's password: the login reads it from there, the browser types it.
        env={"ATSYNC_PASSWORD": "hunter22", PASSWORD_VARIABLE: "hunter22"},
        after={
            "atsync dev-pds": """
import json
from atsync.cli._devpds import running_dir
dev = json.loads(_)  # the line it printed
assert set(dev) == {"pds_url", "plc_url", "admin_password", "accounts"}, dev
# It lists itself before printing the line: running-dev-pds/<pid>.json under $ATSYNC_CACHE_DIR.
listed = [json.loads(p.read_text()) for p in running_dir().glob("*.json")]
mine = [entry for entry in listed if entry["pds_url"] == dev["pds_url"]]
assert len(mine) == 1 and set(mine[0]) == {"pds_url", "plc_url", "pid"}, listed
assert mine[0]["plc_url"] == dev["plc_url"], (mine, dev)
""",
            "atsync login --oauth": """
from atsync.atproto import FileSessionStore
stored = [json.loads(p.read_text()) for p in FileSessionStore().directory.glob("*.json")]
assert [s.get("type") for s in stored] == ["oauth"], stored  # in place of the password one
""",
            "atsync push": """
from atsync.atproto import BlockingXrpcClient
with BlockingXrpcClient(dev["pds_url"]) as client:
    did = dev["accounts"]["alice.test"]["did"]
    records = [r.value for r in client.iter_records(did, "com.example.notes.note")]
assert records == [{"$type": "com.example.notes.note", "title": "written offline"}], records
""",
            "atsync logout": """
assert not list(FileSessionStore().directory.glob("*.json"))  # forgotten here
""",
            'account = pds.accounts["alice.test"]': """
from atsync.atproto import DevAccount
assert isinstance(account, DevAccount) and account.did.startswith("did:plc:"), account
assert (account.handle, account.password) == ("alice.test", "pw") and not pds.running
""",
        },
        checks="""
# Stopped (SIGTERM, exit code 0: checked as it stopped), it is no longer listed.
listed = [json.loads(p.read_text()) for p in running_dir().glob("*.json")]
assert not [entry for entry in listed if entry["pds_url"] == dev["pds_url"]], listed
""",
    ),
    "identity.md": Doc(
        pds="shared",
        # The guide's `pds`: the running dev PDS (a DevPDS, see dev-pds.md).
        prelude="""
from types import SimpleNamespace
pds = SimpleNamespace(pds_url="{pds_url}", plc_url="{plc_url}")
""",
        substitutions=(
            # The first example resolves through DNS and plc.directory; here, as the guide
            # says under Options, the dev PDS's account through the dev PDS's resolver.
            ("IdentityResolver()", DEV_RESOLVER),
            ('resolver.resolve("alice.example.com")', 'resolver.resolve("alice.test")'),
            ('r.resolve("did:plc:…")', 'r.resolve("{did_alice}")'),
        ),
        after={
            "ident.display_handle": """
assert (ident.did, ident.handle, ident.pds) == ("{did_alice}", "alice.test", "{pds_url}")
assert ident.signing_key.startswith("did:key:z") and ident.handle_problem is None, ident
assert ident.display_handle == "alice.test"
""",
            "web_origin=lambda host: pds.pds_url)": """
async with _ as resolver:  # the resolver the guide made for the dev PDS
    assert (await resolver.resolve("alice.test")).did == "{did_alice}"
""",
        },
    ),
    "lexicons.md": Doc(
        after={
            "validate_record_json(": """
from atsync import RecordError
assert record == note  # no links or bytes in it: the same record
try:
    validate_record(lexicons, "com.example.notes.note", {**note, "tags": ["a", 5]})
    raise AssertionError("a record breaking its Lexicon passed")
except RecordError as e:
    assert str(e).startswith("$.tags[1]: "), e  # the JSON path of the value first
""",
            "atsync lexicon model": """
import json
assert json.loads(_) == model_from_lexicon(lexicons, "com.example.notes.note")
""",
        },
        checks="""
assert contract.models["notes"] == model_from_lexicon(lexicons, "com.example.notes.note")
assert list(sync.bindings) == ["notes"]
""",
    ),
    "modeldb.md": Doc(
        after={
            'order_by={"title": "desc"}, limit=10)': """
assert _ == [{"id": "n1", "title": "hello", "body": None, "meta": {"pinned": True},
              "tags": ["t1"]}], _
""",
            "api.add_index": """
assert _ is False  # `db.get("notes", "n1")["pinned"]     # False`
assert db.get("notes", "n2") == {"id": "n2", "title": "draft", "body": None, "meta": None,
                                 "tags": [], "pinned": False, "folder": None}
""",
        },
        # The live query's calls, as the comments show them: at once, then after one write.
        stdout=("['hello']", "['draft', 'hello']"),
    ),
    "oauth.md": Doc(
        pds=(("alice.test", "alice-pw"),),
        browser=True,
        env={PASSWORD_VARIABLE: "alice-pw"},  # what the user types on the PDS's page
        prelude="from atsync.atproto import IdentityResolver  # for the dev PDS, see below\n",
        substitutions=(
            (
                'signer.login_oauth("alice.example.com")',
                f'signer.login_oauth("alice.test", identity={OAUTH_DEV_RESOLVER})',
            ),
        ),
        checks="""
import json
from atsync.atproto import FileSessionStore, OAuthSession
session = signer.session
assert isinstance(session, OAuthSession) and session.did == "{did_alice}", session
# No engine attached: the scope is atproto transition:generic.
assert session.data.scope == "atproto transition:generic", session.data.scope
# § What is stored where: for ATPSigner under atsync-session-<did:key>, no password.
key = f"atsync-session-{signer.key_did}"
stored = FileSessionStore().load(key)
assert stored["type"] == "oauth" and stored["did"] == "{did_alice}" and "dpop_jwk" in stored
assert "alice-pw" not in json.dumps(stored)
# App.open resumes it (resume_session: whichever kind was stored).
again = ATPSigner()
with App.open("notes.db", contract, signer=again) as app:
    assert isinstance(again.session, OAuthSession) and app.did == "{did_alice}", again.session
    assert [entry.name for entry in app.log] == ["add_note"]  # the note written offline
    again.logout()  # revokes the grant, deletes the stored copy
assert FileSessionStore().load(key) is None
""",
    ),
    "pull.md": Doc(
        pds=ALICE,
        setup=a_note_from_the_phone,
        prelude=APP_PASSWORD,
        substitutions=(LOGIN,),
        env=DEV_PLC,
        after={
            'app.db.query("notes")': f"""
assert _ == [{{"id": "{PHONE_RKEY}", "title": "from the phone"}}], _
assert sync.status.download_error is None and sync.status.rev is not None, sync.status
""",
        },
        # The one $remote entry: the phone's note, attributed to the account.
        stdout=(
            f"… {{did_alice}} [['notes', '{PHONE_RKEY}', "
            f"{{'id': '{PHONE_RKEY}', 'title': 'from the phone'}}]]",
        ),
    ),
    "raw-sql.md": Doc(afterwards=raw_sql_tables_are_the_real_ones),
    "sessions.md": Doc(
        pds=(("alice.test", "alice-pw"),),
        # The reader's account: its DID (from an earlier login) and its password.
        prelude='did, password = "{did_alice}", "alice-pw"\n',
        substitutions=(('"https://pds.example"', '"{pds_url}"'),),
        checks="""
import json, os, stat
from pathlib import Path
# Logged out: revoked on the server, the stored copy deleted.
assert not session.alive and store.load(did) is None
assert store.directory == Path(os.environ["XDG_DATA_HOME"], "atsync", "sessions")
# § What is persisted, where: five fields, 0600, the file named by the URL-quoted DID.
session = await login("alice.test", password, "{pds_url}", store=store)
path = store.path_for(did)
assert path.name == did.replace(":", "%3A") + ".json", path
fields = {"did", "handle", "pds_url", "access_jwt", "refresh_jwt"}
assert set(json.loads(path.read_text())) == fields and password not in path.read_text()
assert stat.S_IMODE(path.stat().st_mode) == 0o600
assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
# The next start resumes it without the password.
resumed = Session.resume(store, did)
async with XrpcClient(session=resumed) as client:
    answer = await client.query("com.atproto.server.getSession", auth=True)
assert (answer["did"], answer["handle"]) == (did, "alice.test"), answer
await resumed.logout()
assert store.load(did) is None
""",
    ),
    "signers.md": Doc(
        pds=ALICE,
        prelude=APP_PASSWORD + "from atsync.atproto import IdentityResolver  # see below\n",
        substitutions=(
            LOGIN,
            # The account's DID document is on the dev PDS's PLC directory.
            (
                "BlockingIdentityResolver() as resolver",
                'BlockingIdentityResolver(IdentityResolver(plc_url="{plc_url}")) as resolver',
            ),
        ),
        stdout=("did:key:z6Mk…", "did:key:zQ3s…"),  # an ed25519 key, then a k256 one
        after={
            "verify_signature(signer.key_did": "assert _ is True",
            "app.author_of(entry)": """
offline, online = app.log
assert offline.author == signer.key_did and online.author == "{did_alice}"
assert _ == [(signer.key_did, "{did_alice}"), ("{did_alice}", "{did_alice}")], _
""",
        },
        checks="""
# The authorization record the guide shows, on the PDS.
from atsync.atproto import BlockingXrpcClient
assert did == "{did_alice}" and collection == "com.example.notes.session"
with BlockingXrpcClient("{pds_url}") as client:
    rkey = signer.key_did.removeprefix("did:key:")
    record = client.get_record(did, "com.example.notes.session", rkey).value
assert record["$type"] == "com.example.notes.session", record
assert (record["key"], record["app"]) == (signer.key_did, "com.example.notes"), record
assert sorted(record) == ["$type", "app", "createdAt", "key"], record
""",
    ),
    "status.md": Doc(
        pds=ALICE,
        prelude=APP_PASSWORD,
        substitutions=(LOGIN_ASYNC,),
        env=DEV_PLC,
        after={
            "async with ATSync(": """
assert sync.row_state("notes", key) == "synced"
assert sync.status.state == "stopped" and sync.status.pending == 0, sync.status
assert sync.status.has_synced and sync.status.last_pushed_at is not None, sync.status
from atsync.atproto import BlockingXrpcClient
with BlockingXrpcClient("{pds_url}") as client:
    record = client.get_record("{did_alice}", "com.example.notes.note", key).value
assert record == {"$type": "com.example.notes.note", "title": "hello"}, record
""",
        },
        afterwards=status_fields_are_the_real_ones,
    ),
    "strategies.md": Doc(
        checks="""
assert sync.strategy == Debounce(0.5) and sync.pull_strategy == Live()
assert sync.bindings["metrics"].binding.strategy == Interval(60)
assert sync.bindings["notes"].binding.strategy is None  # the engine's push=
# "# the default": an engine given neither push= nor pull=.
with App.open("defaults.db", contract) as other:
    plain = ATSync(other, bindings={"notes": Binding("com.example.notes.note")})
    assert (plain.strategy, plain.pull_strategy) == (Debounce(0.5), Live())
# The defaults the tables state.
assert Debounce() == Debounce(0.5) and Batch() == Batch(50, 5) and Interval() == Interval(10)
assert Live() == Live(fallback=5.0) and Poll() == Poll(30)
""",
    ),
    "sync.md": Doc(
        pds=ALICE,
        prelude=APP_PASSWORD,
        substitutions=(LOGIN,),
        env=DEV_PLC,
        checks="""
from atsync.atproto import BlockingXrpcClient
with BlockingXrpcClient("{pds_url}") as client:
    records = client.iter_records("{did_alice}", "com.example.notes.note")
    on_pds = [(r.rkey, r.value) for r in records]
(key,) = [row["id"] for row in app.db.query("notes")]
# The note queued before login is a record, once; the async engine pulled it back, verified.
assert on_pds == [(key, {"$type": "com.example.notes.note", "title": "hello"})], on_pds
status = sync.status
assert (status.pending, status.failed, status.has_synced) == (0, 0, True), status
assert status.download_error is None and status.rev is not None, status
assert app.did == "{did_alice}"
""",
    ),
    "xrpc.md": Doc(
        pds=(("alice.test", "hunter22"),),
        # The guide's PDS listens on the reference PDS's usual port; this one on a free port.
        substitutions=(('"http://localhost:2583"', '"{pds_url}"'),),
        # Only the edited record: "a" was created and deleted; the PDS adds the $type.
        stdout=("… {'text': 'b', '$type': 'com.example.note'}",),
        checks="""
from pathlib import Path
from atsync.atproto import read_car
assert session.did == "{did_alice}"
assert rec.rkey == tid and w.uri == f"at://{did_alice}/com.example.note/{tid}", (rec, w)
car = read_car(Path("repo.car").read_bytes())  # the blocks written since `rev`
assert car.roots and Path("repo.car").stat().st_size > 0
assert frame.type == "#commit" and last_seq == frame.seq > 0, frame
assert FileSessionStore().load(session.did)["did"] == session.did  # the session was saved
""",
    ),
}


# -- running a guide --------------------------------------------------------------------------


def _line_pattern(shown: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in shown.split("…")))


def lines_match(shown: list[str] | tuple[str, ...], actual: list[str]) -> bool:
    return len(shown) == len(actual) and all(
        _line_pattern(s.rstrip()).fullmatch(a.rstrip()) for s, a in zip(shown, actual, strict=True)
    )


def _run_command(step: Step, where: str) -> str:
    """Run ``step``'s command, check it as the module's docstring says; what it printed."""
    try:
        done = subprocess.run(
            ["bash", "-c", step.code],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"{where}: `{step.code}` did not finish within {COMMAND_TIMEOUT} s:\n"
            f"{_text(e.stdout)}{_text(e.stderr)}"
        ) from None
    # The transcript goes to stderr: stdout is what the guide's Python code prints.
    print(f"$ {step.code}\n{done.stdout}{done.stderr}", end="", file=sys.stderr, flush=True)
    fails = bool(step.output) and step.output[0].startswith("Error")
    if fails:
        assert done.returncode != 0, f"{where}: `{step.code}` should fail, as the guide shows"
        actual = (done.stderr + done.stdout).rstrip("\n").splitlines()
    else:
        assert done.returncode == 0, (
            f"{where}: `{step.code}` exited with {done.returncode}:\n{done.stdout}{done.stderr}"
        )
        actual = done.stdout.rstrip("\n").splitlines()
    if step.output:
        assert lines_match(step.output, actual), (
            f"{where}: `{step.code}` printed\n"
            + "\n".join(actual)
            + "\n\nthe guide shows\n"
            + "\n".join(step.output)
        )
    return done.stdout


def start_background(
    command: str, where: str, *, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Start ``command``, which runs until stopped (``stop_background``), and wait for the
    first line it prints: (the process, that line). Its stderr is this process's."""
    process = subprocess.Popen(
        # `exec`: the process is the command itself, so the SIGTERM reaches it.
        ["bash", "-c", f"exec {command}"],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    # Not a delay: a bound on how long its first line may take (a PDS starts in seconds).
    deadline = threading.Timer(COMMAND_TIMEOUT, process.kill)
    deadline.start()
    try:
        line = process.stdout.readline().rstrip("\n")
    finally:
        deadline.cancel()
    print(f"$ {command}   (in the background)\n{line}", file=sys.stderr, flush=True)
    if not line:
        code = process.wait()
        raise AssertionError(f"{where}: `{command}` printed nothing and exited with {code}")
    return process, line


def stop_background(process: subprocess.Popen[str], how: int = signal.SIGTERM) -> int:
    """Stop it (SIGTERM, or ``how``); its exit code (killed if it does not exit within
    COMMAND_TIMEOUT)."""
    if process.poll() is None:
        process.send_signal(how)
    try:
        return process.wait(COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"it did not stop within {COMMAND_TIMEOUT} s of SIGTERM") from None


def drive(plan_file: str) -> None:
    """Run a guide's plan (written by ``run_doc``) in this process: ``python this_file plan``."""
    plan = json.loads(Path(plan_file).read_text())
    namespace: dict[str, Any] = {"__name__": "__main__"}
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    running: list[tuple[str, Step, subprocess.Popen[str]]] = []
    try:
        for step in plan:
            where = f"{step['file']}:{step['line']}"
            if step["kind"] == "stop":  # the guide is over: its background commands stop
                while running:
                    started, command, process = running.pop()
                    code = stop_background(process)
                    assert code == 0, f"{started}: `{command.code}` exited with {code} on SIGTERM"
                continue
            step_ = Step(step["kind"], step["line"], step["code"], tuple(step["output"]))
            if step_.kind == "shell" and step["background"]:
                process, line = start_background(step_.code, where)
                running.append((where, step_, process))
                if step_.output:
                    assert lines_match(step_.output[:1], [line]), (
                        f"{where}: `{step_.code}` printed\n{line}\n\nthe guide shows\n"
                        + "\n".join(step_.output)
                    )
                namespace["_"] = line
                continue
            if step_.kind == "shell":
                namespace["_"] = _run_command(step_, where)
                continue
            code = _compile(step_.code, step_.line, step["file"])
            result = eval(code, namespace)  # the guide's code: what is tested
            if code.co_flags & inspect.CO_COROUTINE:
                loop.run_until_complete(result)
            sys.stdout.flush()
    finally:
        for _, _, process in running:  # the guide failed: stop them all the same
            with contextlib.suppress(AssertionError):
                stop_background(process)


def _compile(code: str, line: int, filename: str) -> Any:
    """``code`` compiled to run with top-level ``await``; as in the interactive interpreter,
    the value of a last expression statement is kept in ``_`` (for the checks)."""
    # Blank lines first, so that a traceback names the guide's own line numbers.
    source = "\n" * (line - 1) + code
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    tree = compile(source, filename, "exec", flags=flags | ast.PyCF_ONLY_AST)
    last = tree.body[-1] if tree.body else None
    if isinstance(last, ast.Expr):
        keep = ast.Assign(targets=[ast.Name("_", ast.Store())], value=last.value)
        tree.body[-1] = ast.fix_missing_locations(ast.copy_location(keep, last))
    return compile(tree, filename, "exec", flags=flags)


def run_doc(
    name: str, doc: Doc, tmp_path: Path, context: Mapping[str, str], cache: Path | None = None
) -> str:
    text = written = (DOCS_DIR / name).read_text()
    for old, new in doc.substitutions:
        assert old in text, f"docs/{name} no longer contains {old!r}: update its substitutions"
        text = text.replace(old, doc.render(new, context))
    steps = read_steps(text)
    assert steps, f"docs/{name} has no code to run: take it out of DOCS"
    as_written = read_steps(written)  # what the checks' anchors refer to
    assert [s.line for s in steps] == [s.line for s in as_written], "a substitution added lines"
    path = str(DOCS_DIR / name)
    here = str(Path(__file__).resolve())

    def ours(code: str) -> dict[str, Any]:
        return {"kind": "python", "line": 1, "code": doc.render(code, context), "output": []}

    plan = [{**ours(doc.prelude), "file": f"{here} (prelude of {name})"}] if doc.prelude else []
    for step, original in zip(steps, as_written, strict=True):
        background = step.kind == "shell" and step.code.startswith(doc.background)
        plan.append({**step.__dict__, "output": list(step.output), "file": path})
        plan[-1]["background"] = bool(doc.background) and background
        for anchor, check in doc.after.items():
            if anchor in original.code:
                plan.append({**ours(check), "file": f"{here} (after {anchor!r})"})
    for anchor in doc.after:
        found = sum(anchor in s.code for s in as_written)
        assert found == 1, f"docs/{name}: {found} blocks hold {anchor!r}, the checks need one"
    started = [p for p in plan if p.get("background")]
    assert len(started) == len(doc.background), f"docs/{name}: no command starts {doc.background}"
    if started:
        plan.append({"kind": "stop", "line": 0, "code": "", "output": [], "file": path})
    if doc.checks:
        plan.append({**ours(doc.checks), "file": f"{here} (checks of {name})"})
    work = tmp_path / "work"
    work.mkdir()
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "XDG_DATA_HOME": str(tmp_path / "data"),  # the session store: the test's own
        **{k: doc.render(v, context) for k, v in doc.env.items()},
    }
    if cache is not None:
        env["ATSYNC_CACHE_DIR"] = str(cache)
    if doc.browser:
        assert PASSWORD_VARIABLE in doc.env, f"docs/{name}: the browser needs a password"
        env["BROWSER"] = str(browser_command(tmp_path))
    try:
        done = subprocess.run(
            [sys.executable, here, str(plan_file)],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=DOC_TIMEOUT,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"docs/{name} hung ({DOC_TIMEOUT} s):\n{_text(e.stdout)}\n{_text(e.stderr)}")
    if done.returncode != 0:
        pytest.fail(f"docs/{name} failed:\n{done.stdout}\n{done.stderr}", pytrace=False)
    return done.stdout


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


# -- the sqlite3 command ----------------------------------------------------------------------

_HOW_TO_INSTALL_SQLITE3 = (
    "the guides run `sqlite3` commands, and the sqlite3 command-line shell is missing; "
    "installing it failed: {why}. Install it as root (`apt-get install sqlite3`, or "
    "`sudo apt-get install sqlite3`), then run the tests again."
)


def _install_sqlite3() -> None:
    # Installed on first use, as the OAuth tests install chromium: root, or sudo without a
    # password prompt (-n); a failure that says what to do otherwise, never a skip.
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo") is not None:
        prefix = ["sudo", "-n"]
    else:
        pytest.fail(_HOW_TO_INSTALL_SQLITE3.format(why="not root, and no sudo"), pytrace=False)
    print("[docs] installing sqlite3 (apt-get, once)", file=sys.stderr, flush=True)
    for step in (["apt-get", "update"], ["apt-get", "install", "-y", "sqlite3"]):
        # `env` carries the variable across sudo, which resets the environment.
        command = [*prefix, "env", "DEBIAN_FRONTEND=noninteractive", *step]
        try:
            code = subprocess.run(command, stdin=subprocess.DEVNULL, check=False).returncode
        except OSError as e:  # no apt-get (not Debian), or no env
            why = f"{' '.join(command)}: {e}"
        else:
            if code == 0:
                continue
            why = f"`{' '.join(command)}` exited with {code}"
        pytest.fail(_HOW_TO_INSTALL_SQLITE3.format(why=why), pytrace=False)


@pytest.fixture(scope="session")
def sqlite3_cli(request: pytest.FixtureRequest) -> str:
    if shutil.which("sqlite3") is None:
        capman = request.config.pluginmanager.getplugin("capturemanager")
        if capman is None:
            _install_sqlite3()
        else:
            with capman.global_and_fixture_disabled():  # apt-get's progress, not a silent wait
                _install_sqlite3()
    found = shutil.which("sqlite3")
    if found is None:
        why = "apt-get succeeded but did not provide it"
        pytest.fail(_HOW_TO_INSTALL_SQLITE3.format(why=why), pytrace=False)
    return found


# -- the tests --------------------------------------------------------------------------------


def _runnable(name: str) -> bool:
    return bool(read_steps((DOCS_DIR / name).read_text()))


def test_every_guide_with_code_is_run_or_listed() -> None:
    guides = sorted(p.name for p in DOCS_DIR.glob("*.md"))
    unlisted = [
        g for g in guides if _runnable(g) and g not in DOCS and g not in PENDING and g not in EXEMPT
    ]
    assert not unlisted, f"guides with code that no test runs: {unlisted}; add them to DOCS"
    assert not [g for g in DOCS if not _runnable(g)], "a guide in DOCS has no code to run"
    assert set(DOCS) | set(PENDING) | set(EXEMPT) <= set(guides)


def _pds_context(pds: Any) -> dict[str, str]:
    context = {"pds_url": pds.pds_url, "plc_url": pds.plc_url}
    for handle, account in pds.accounts.items():
        context[f"did_{handle.removesuffix('.test')}"] = account.did
    return context


def _param(name: str) -> Any:
    doc = DOCS[name]
    marks = [pytest.mark.pds] if doc.pds is not None or doc.starts_pds else []
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", [_param(n) for n in DOCS])
def test_the_guide_runs_as_written(
    name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    doc = DOCS[name]
    text = (DOCS_DIR / name).read_text()
    if any(s.kind == "shell" and re.match(r"sqlite3\b", s.code) for s in read_steps(text)):
        request.getfixturevalue("sqlite3_cli")
    cache: Path | None = None
    if doc.starts_pds:
        install = request.getfixturevalue("pds_install")
        # A cache directory of the guide's own, holding the real install: `atsync dev-pds`
        # lists itself there, so the guide's `atsync login alice.test` finds its dev PDS and
        # not another one running on this machine (another test run's, a developer's).
        cache = tmp_path / "cache"
        cache.mkdir()
        (cache / install.install_dir.name).symlink_to(install.install_dir)
    if doc.browser:
        request.getfixturevalue("chromium")
    context: dict[str, str] = {}
    if doc.pds is not None:
        if doc.pds == "shared":
            pds = request.getfixturevalue("dev_pds")
        else:
            pds = request.getfixturevalue("make_pds")(accounts=doc.pds)
        context = _pds_context(pds)
        if doc.setup is not None:
            doc.setup(pds)
    out = run_doc(name, doc, tmp_path, context, cache).splitlines()
    if doc.afterwards is not None:
        doc.afterwards(text, tmp_path / "work")
    if doc.stdout is not None:
        expected = [doc.render(line, context) for line in doc.stdout]
        assert lines_match(expected, out), (
            f"docs/{name}: the guide's code printed\n"
            + "\n".join(out)
            + "\n\nexpected\n"
            + "\n".join(expected)
        )


def test_the_reader_finds_blocks_commands_and_their_output() -> None:
    text = (
        '```python\nx = 1\n```\n\n```\n$ echo "a\n  b"   # two lines\na\n  b\n'
        "$ true   # the PDS's own\n\n```\n\n```json\n{}\n```\n```\nCREATE TABLE t (x)\n```\n"
    )
    assert read_steps(text) == [
        Step("python", 2, "x = 1\n"),
        Step("shell", 6, 'echo "a\n  b"   # two lines', ("a", "  b")),
        Step("shell", 10, "true   # the PDS's own"),  # a quote in a comment opens nothing
    ]
    assert plain_blocks(text) == [
        '$ echo "a\n  b"   # two lines\na\n  b\n$ true   # the PDS\'s own\n',
        "CREATE TABLE t (x)",
    ]
    assert lines_match(["did:key:z6Mk…", "x"], ["did:key:z6MkABC", "x"])
    assert not lines_match(["did:key:z6Mk…"], ["did:key:zQ3sABC"])
    assert not lines_match(["a"], ["a", "b"])


def test_a_command_must_print_what_the_guide_shows_and_fail_only_where_it_shows() -> None:
    _run_command(Step("shell", 1, "printf 'a\\nb\\n'", ("a", "b")), "here")
    _run_command(Step("shell", 1, "echo 'Error: no' >&2; exit 2", ("Error: no",)), "here")
    with pytest.raises(AssertionError, match="printed"):
        _run_command(Step("shell", 1, "echo b", ("a",)), "here")
    with pytest.raises(AssertionError, match="exited with 1"):
        _run_command(Step("shell", 1, "false"), "here")
    with pytest.raises(AssertionError, match="should fail"):
        _run_command(Step("shell", 1, "echo 'Error: no'", ("Error: no",)), "here")


def test_a_background_command_runs_until_stopped_and_its_first_line_is_awaited() -> None:
    ready = (
        "import signal, sys; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
        "print('ready', flush=True); signal.pause()"
    )
    process, line = start_background(f'{shlex.quote(sys.executable)} -c "{ready}"', "here")
    assert line == "ready" and process.poll() is None  # still running
    assert stop_background(process) == 0
    with pytest.raises(AssertionError, match="printed nothing and exited with 1"):
        start_background("false", "here")


# -- what guides show but do not run ----------------------------------------------------------


def test_errors_md_draws_the_real_exception_tree() -> None:
    import atsync

    tree = next(b for b in plain_blocks((DOCS_DIR / "errors.md").read_text()) if "──" in b)
    drawn: dict[str, str | None] = {}
    parents: list[str] = []
    for line in tree.splitlines():
        name = re.search(r"(\w+)", line.split("── ")[-1])
        assert name is not None, line
        depth = 0 if "── " not in line else line.index("── ") // 4 + 1
        del parents[depth:]
        drawn[name[1]] = parents[-1] if parents else None
        parents.append(name[1])
    real: dict[str, str | None] = {}
    for name in drawn:
        cls = getattr(atsync, name)
        ours = [b for b in cls.__bases__ if issubclass(b, atsync.AtsyncError)]
        real[name] = ours[0].__name__ if ours else None
    assert drawn == real
    exported = {n: getattr(atsync, n) for n in atsync.__all__}
    errors = {n for n, v in exported.items() if isinstance(v, type) and issubclass(v, Exception)}
    assert set(drawn) == errors, "the tree in docs/errors.md misses or invents a class"
    # "UnknownModelError and NotFoundError are also KeyErrors, ValidationError and
    # InvalidSyntaxError also ValueErrors"
    key_errors = {n for n in drawn if issubclass(getattr(atsync, n), KeyError)}
    value_errors = {n for n in drawn if issubclass(getattr(atsync, n), ValueError)}
    assert key_errors == {"UnknownModelError", "NotFoundError"}
    assert value_errors == {"ValidationError", "RecordError", "InvalidSyntaxError"}


def test_action_log_md_shows_the_real_log_table(tmp_path: Path) -> None:
    from atsync import App, Contract

    shown = next(
        b for b in plain_blocks((DOCS_DIR / "action-log.md").read_text()) if "_atsync_log" in b
    )
    with App.open(tmp_path / "notes.db", Contract(models={"notes": {"id": "primary"}})) as app:
        stored = app.model_db.connection
        real = stored.execute("pragma table_info(_atsync_log)").fetchall()
        (real_sql,) = stored.execute(
            "select sql from sqlite_master where name = '_atsync_log'"
        ).fetchone()
    with contextlib.closing(sqlite3.connect(":memory:")) as doc_db:
        doc_db.execute(shown)  # the shown statement, comments and all, is valid SQL
        assert doc_db.execute("pragma table_info(_atsync_log)").fetchall() == real
    assert shown.rstrip().endswith("WITHOUT ROWID") and real_sql.endswith("WITHOUT ROWID")


def test_bindings_md_states_the_real_signatures() -> None:
    from atsync.sync import ActionCall, Binding, RecordWrite, Transform

    text = " ".join((DOCS_DIR / "bindings.md").read_text().split())
    shown = re.search(r"`(Binding\(collection, .*?\))`", text)
    assert shown is not None
    call = ast.parse(shown[1], mode="eval").body
    assert isinstance(call, ast.Call)
    names = [a.id for a in call.args if isinstance(a, ast.Name)]
    names += [k.arg for k in call.keywords if k.arg is not None]
    fields = dataclasses.fields(Binding)
    assert names == [f.name for f in fields]
    for keyword, f in zip(call.keywords, fields[len(call.args) :], strict=True):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert ast.literal_eval(keyword.value) == default, f.name
    for cls, shown_fields in (
        (Transform, "Transform(to_record, from_record)"),
        (ActionCall, "ActionCall(name, args, kwargs, ctx)"),
        (RecordWrite, "RecordWrite(collection, rkey, record | None)"),
    ):
        assert shown_fields in text, shown_fields
        listed = [p.split()[0] for p in shown_fields.split("(")[1].rstrip(")").split(", ")]
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        assert listed == required, cls  # the call the guide shows; others have defaults


def test_durability_md_states_the_real_defaults(tmp_path: Path) -> None:
    from atsync import App, Contract, ModelDB, TransactionError

    text = (DOCS_DIR / "durability.md").read_text()
    options = inspect.signature(ModelDB.open).parameters
    assert '`durability="normal"` (the default' in text
    assert options["durability"].default == "normal"
    assert "(5 s by default)" in text and options["timeout"].default == 5.0
    # "a second `App.open` fails with `TransactionError` naming the holder's pid"
    contract = Contract(models={"notes": {"id": "primary"}})
    with App.open(tmp_path / "x.db", contract), pytest.raises(TransactionError) as e:
        App.open(tmp_path / "x.db", contract)
    assert str(os.getpid()) in str(e.value)


def test_api_md_names_what_atsync_exports() -> None:
    import atsync
    from atsync import atproto

    text = (DOCS_DIR / "api.md").read_text()
    reexports = text[text.index("`atsync` re-exports") : text.index("## Packages")]
    named = set(re.findall(r"`([A-Z]\w+)`", reexports))
    assert named and named <= set(atsync.__all__), named - set(atsync.__all__)
    rule2 = text[text.index("2. **The async-first") : text.index("3. **The one exception")]
    names = set(re.findall(r"`(\w+)`", rule2)) - {"Blocking", "blocking_"}  # the prefixes
    assert names <= set(atproto.__all__), names - set(atproto.__all__)
    pairs = re.findall(r"`(\w+)\.(\w+)\(\)` /\s+`(\w+)\(\)`", text)
    assert len(pairs) == 5, pairs
    for owner, blocking, asynchronous in pairs:
        cls = getattr(atsync, owner, None) or getattr(atproto, owner)
        assert asynchronous == f"{blocking}_async"
        assert not inspect.iscoroutinefunction(getattr(cls, blocking)), (owner, blocking)
        assert inspect.iscoroutinefunction(getattr(cls, asynchronous)), (owner, asynchronous)


def test_the_guide_map_lists_every_guide() -> None:
    listed = set(re.findall(r"\]\(([\w-]+\.md)[#)]", (DOCS_DIR / "README.md").read_text()))
    guides = {p.name for p in DOCS_DIR.glob("*.md")} - {"README.md"}
    assert guides <= listed, f"docs/README.md does not list {sorted(guides - listed)}"


if __name__ == "__main__":
    drive(sys.argv[1])
