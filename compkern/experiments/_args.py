"""The shared CLI vocabulary of the `compkern` subcommands: one spelling per option, old spellings
kept as hidden aliases (help suppressed) for one release.

    --batch-size N    items per batch / step        (old: --batch)
    --train-steps N   optimizer steps               (old: --steps where it meant training)
    --sample-steps N  sampling steps / levels       (old: --steps where it meant sampling)
    --out DIR         always a folder
    --threads N, --no-progress, --seed N
"""
from __future__ import annotations

import argparse
from typing import Any, Sequence


def add_alias(p: argparse.ArgumentParser, old: str | Sequence[str], dest: str, **kw: Any) -> None:
    """Accept the old spelling(s) ``old`` for ``dest``, hidden from --help; the new option's
    default stays the default."""
    names = [old] if isinstance(old, str) else list(old)
    p.add_argument(*names, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kw)


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (use 1 on a shared machine)")


def add_seed(p: argparse.ArgumentParser, default: int = 0, help: str = "random seed") -> None:
    p.add_argument("--seed", type=int, default=default, help=help)


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_batch_size(p: argparse.ArgumentParser, default: int, help: str = "batch size", *, dest: str = "batch_size",
                   old: Sequence[str] = ("--batch",)) -> None:
    p.add_argument("--batch-size", dest=dest, type=int, default=default, help=help)
    if old:
        add_alias(p, old, dest, type=int)


def add_train_steps(p: argparse.ArgumentParser, default: int | None, help: str = "training steps", *,
                    dest: str = "train_steps", old: Sequence[str] = ("--steps",)) -> None:
    p.add_argument("--train-steps", dest=dest, type=int, default=default, help=help)
    if old:
        add_alias(p, old, dest, type=int)


def add_sample_steps(p: argparse.ArgumentParser, default: int, help: str = "sampling steps", *,
                     dest: str = "sample_steps", old: Sequence[str] = ("--steps",)) -> None:
    p.add_argument("--sample-steps", dest=dest, type=int, default=default, help=help)
    if old:
        add_alias(p, old, dest, type=int)


def set_threads(args: argparse.Namespace) -> None:
    """torch.set_num_threads(args.threads) when given."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
