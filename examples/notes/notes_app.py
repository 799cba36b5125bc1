"""A small offline notes app: the contract (models + actions) that the demo and the ``notes.py``
command line drive, and how it syncs.

Notes have a title, an optional body, tags (a relation), a done flag and an optional image (a
blob). Drafts are shared: everyone who shares them edits the same rows, merged field by field.
Every change goes through an action, so it is logged, signed and pushed to the user's
repository as records of the example's own Lexicons (``lexicons/``, checked before anything
is queued).
"""

from __future__ import annotations

from pathlib import Path

from atsync import ActionContext, Binding, BlobRef, Contract

COLLECTION = "com.example.notes.note"
DRAFTS = "com.example.notes.draft"  # a shared collection
LEXICONS = Path(__file__).parent / "lexicons"


def bindings() -> dict[str, Binding]:
    """Notes go to the user's repository; drafts are shared with the people they follow."""
    return {"notes": Binding(COLLECTION), "drafts": Binding(DRAFTS, shared=True)}


def lexicons() -> list[Path]:
    return sorted(LEXICONS.glob("*.json"))


contract = Contract(
    models={
        "notes": {
            "id": "primary",
            "title": "string",
            "body": "string?",
            "done": "boolean",
            "created_at": "integer",
            "author": "string",
            "tags": "@tags[]",
            "image": "blob?",
            "$indexes": ["done/created_at"],
        },
        "tags": {"id": "primary", "label": "string"},
        # Drafts are shared: written by several people, merged field by field (see the demo).
        "drafts": {"id": "primary", "title": "string?", "body": "string?"},
    },
    nsid="com.example.notes",
)


@contract.action
def create_note(ctx: ActionContext, title: str, body: str | None = None) -> str:
    key = ctx.tid()  # a record key that replaying the log reproduces
    ctx.db.set(
        "notes",
        {
            "id": key,
            "title": title,
            "body": body,
            "done": False,
            "created_at": ctx.timestamp,
            "author": ctx.did,
        },
    )
    return key


@contract.action
def edit_note(
    ctx: ActionContext, key: str, title: str | None = None, body: str | None = None
) -> None:
    changes: dict[str, object] = {"id": key}
    if title is not None:
        changes["title"] = title
    if body is not None:
        changes["body"] = body
    ctx.db.update("notes", changes)


@contract.action
def attach_image(ctx: ActionContext, key: str, image: dict[str, object]) -> None:
    """Set a note's image: ``image`` is a ``BlobRef``'s JSON form (``app.blobs.put(...)``
    stored the bytes first, so the log holds the reference, not the bytes)."""
    ctx.db.update("notes", {"id": key, "image": BlobRef.from_json(image)})


@contract.action
def tag_note(ctx: ActionContext, key: str, label: str) -> None:
    tag_key = label.lower().replace(" ", "-")
    ctx.db.set("tags", {"id": tag_key, "label": label})
    note = ctx.db.get("notes", key)
    if note is None:
        raise ValueError(f"no note {key!r}")
    if tag_key not in note["tags"]:
        ctx.db.update("notes", {"id": key, "tags": [*note["tags"], tag_key]})


@contract.action
def complete_note(ctx: ActionContext, key: str) -> None:
    ctx.db.update("notes", {"id": key, "done": True})


@contract.action
def delete_note(ctx: ActionContext, key: str) -> None:
    ctx.db.delete("notes", key)


@contract.action
def create_draft(ctx: ActionContext, title: str) -> str:
    key = ctx.tid()
    ctx.db.set("drafts", {"id": key, "title": title})
    return key


@contract.action
def delete_draft(ctx: ActionContext, key: str) -> None:
    ctx.db.delete("drafts", key)


@contract.action
def write_draft(
    ctx: ActionContext, key: str, title: str | None = None, body: str | None = None
) -> None:
    current = ctx.db.get("drafts", key)
    changes = {k: v for k, v in (("title", title), ("body", body)) if v is not None}
    if current is None:
        ctx.db.set("drafts", {"id": key, **changes})
    else:
        ctx.db.update("drafts", {"id": key, **changes})
