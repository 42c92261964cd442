"""The subcommands of ``torchbayes``, one module each: ``add_parser(commands)`` declares the
subcommand and its options, ``run(args, console)`` runs it and returns the exit code."""

from __future__ import annotations

from types import ModuleType

from torchbayes.cli.commands import demo, evaluate, medical, predict, quantize, train

__all__ = ["COMMANDS"]

#: Subcommand name -> its module, in the order ``torchbayes --help`` lists them.
COMMANDS: dict[str, ModuleType] = {
    "demo": demo,
    "medical": medical,
    "train": train,
    "evaluate": evaluate,
    "predict": predict,
    "quantize": quantize,
}
