"""Runnable experiments behind the `compkern` subcommands (each module: add_arguments, run)."""
