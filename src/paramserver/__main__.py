"""`python -m paramserver` is the `paramserver` command."""

from paramserver.cli import entry

entry()
