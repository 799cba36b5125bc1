"""ModelDB: the local app database (schema language, SQLite backend, live queries).

Knows nothing of atproto or of apps; usable on its own as an offline database::

    from atsync.db import ModelDB
    db = ModelDB.open("app.db", {"notes": {"id": "primary", "title": "string"}})
    db.set("notes", {"id": "n1", "title": "hello"})
"""

from ._migrations import UpgradeAPI
from ._query import Query
from ._schema import Model, Property, Schema, parse_schema
from ._sqlite import Durability, ModelDB
from ._subscriptions import Subscription

__all__ = [
    "Durability",
    "Model",
    "ModelDB",
    "Property",
    "Query",
    "Schema",
    "Subscription",
    "UpgradeAPI",
    "parse_schema",
]
