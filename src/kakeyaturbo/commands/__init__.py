"""Subcommands of the ``kakeya`` CLI: each module has ``configure(parser)`` and ``run(args) -> int``."""
