"""A small offline notes app: the contract (models + actions) that the demo drives.

Notes have a title, an optional body, tags (a relation) and a done flag. Every change goes
through an action, so it is logged, signed and — once sync lands — pushed to the user's
repository as records.
"""

from __future__ import annotations

from atsync import ActionContext, Contract

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
def write_draft(
    ctx: ActionContext, key: str, title: str | None = None, body: str | None = None
) -> None:
    current = ctx.db.get("drafts", key)
    changes = {k: v for k, v in (("title", title), ("body", body)) if v is not None}
    if current is None:
        ctx.db.set("drafts", {"id": key, **changes})
    else:
        ctx.db.update("drafts", {"id": key, **changes})
