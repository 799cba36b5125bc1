"""Commands that read a local atsync database."""

from __future__ import annotations
