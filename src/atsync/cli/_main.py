"""Entry point of the ``atsync`` command; each sub-command lives in its own module."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="atsync-py", prog_name="atsync")
def main() -> None:
    """atsync — local-first app databases that sync with AT Protocol repositories."""


def _register() -> None:
    # Sub-commands register themselves on import; importing them here keeps `main` the
    # single place that lists what the CLI offers.
    from . import (
        _blobs,  # noqa: F401
        _devpds,  # noqa: F401
        _lexicon,  # noqa: F401
        _sync_commands,  # noqa: F401
    )


_register()
