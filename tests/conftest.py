"""Shared test configuration."""

pytest_plugins = ["pds_fixtures"]
