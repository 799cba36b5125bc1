"""ModelDB: the local app database (schema language, SQLite backend, live queries).

Knows nothing of atproto or of apps; usable on its own as an offline database::

    from atsync.db import ModelDB
    db = ModelDB.open("app.db", {"notes": {"id": "primary", "title": "string"}})
    db.set("notes", {"id": "n1", "title": "hello"})

- ``ModelDB`` (``Durability``): open, read, write, query, subscribe; rows are ``Row`` dicts
- ``Schema``/``Model``/``Property`` and ``parse_schema``: the schema language, parsed
- ``Query``: a compiled query over one model; ``Subscription``: a live query
- ``Upgrade``: an upgrade step, ``(UpgradeAPI, old_version, new_version) -> None``
- ``BlobStore``/``BlobRef``: files kept beside the database, content-addressed; a ``blob``
  property holds a ``BlobRef`` (``db.blobs.put(data, mime)``, ``db.blobs.read(ref)``)
"""

from ._blobs import BlobRef, BlobStore
from ._migrations import Upgrade, UpgradeAPI
from ._query import Query
from ._query import quote as quote_identifier
from ._schema import Model, Property, Schema, parse_schema
from ._sqlite import Durability, ModelDB, Row
from ._subscriptions import Subscription

__all__ = [
    "BlobRef",
    "BlobStore",
    "Durability",
    "Model",
    "ModelDB",
    "Property",
    "Query",
    "Row",
    "Schema",
    "Subscription",
    "Upgrade",
    "UpgradeAPI",
    "parse_schema",
    "quote_identifier",
]
