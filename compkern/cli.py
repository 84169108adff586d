"""`compkern <command>`: each subcommand lives in its own module with ``add_arguments(parser)`` and
``run(args)``; modules are imported only when their command runs.

Every subcommand speaks one vocabulary (compkern.experiments._args): --batch-size, --train-steps,
--sample-steps, --out (a folder), --threads, --no-progress, --seed; older spellings (--batch,
--steps, --ddim-steps, bench's --out FILE) are hidden aliases for one release."""
from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = ("compositional diffusion (CompLift, composable diffusion, MCMC samplers, CoInD, SepEn) on small models; "
               "`compkern COMMAND --help` for a command's options")

COMMANDS = {
    "demo": ("compkern.experiments.demo", "CompLift on 2-D compositions: train tiny models, print the accuracy table, write a PNG"),
    "bench": ("compkern.experiments.bench", "benchmark the ops (torch eager, torch.compile, C++) against the bandwidth floor"),
    "flow-lift": ("compkern.experiments.flow_lift", "CompLift for a flow-matching model vs the exact density ratio (2-D)"),
    "toy2d": ("compkern.experiments.toy2d", "2-D product/mixture/negation: reverse diffusion vs ULA/MALA/HMC"),
    "coind": ("compkern.experiments.coind", "CoInD on colored digits: train, sample, evaluate JSD and conformity"),
    "sepen": ("compkern.experiments.sepen", "Separate-and-Enhance on a procedural shapes world: train, finetune, evaluate"),
    "positions": ("compkern.experiments.positions", "multi-object positions: compose 1..5 objects, MCMC, CompLift"),
    "generate": ("compkern.experiments.generate", "Stable Diffusion composed generation with CompLift rejection"),
    "early-reject": ("compkern.experiments.early_reject", "early rejection measured on the main job's world and suites"),
    "main-job": ("compkern.experiments.main_job", "the main job measured end to end on a trained shapes world (also `bench main-job`)"),
    "eval": ("compkern.experiments.eval", "score methods on GenEval-style, NOT and OR suites with a local detector (resumable)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["bench", "main-job"]:
        argv = ["main-job", *argv[2:]]
    width = max(map(len, COMMANDS))
    epilog = "commands:\n" + "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
    parser = argparse.ArgumentParser(prog="compkern", description=DESCRIPTION, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", metavar="COMMAND", choices=list(COMMANDS), help="one of the commands below")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.error(f"unknown command {argv[0]!r}")
        return 0
    module_name, help_text = COMMANDS[argv[0]]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            parser.error(f"command {argv[0]!r} is not available in this build")
        raise
    cmd = argparse.ArgumentParser(prog=f"compkern {argv[0]}", description=help_text)
    module.add_arguments(cmd)
    return int(module.run(cmd.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
