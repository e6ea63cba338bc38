"""`aigc` command line: thin subcommands that call into the library.

    aigc corpus --out DIR            write the embedded train/validation/test corpus
    aigc report SEARCH_DIR           (re)generate the search report of a finished or partial search
    aigc serve --model DIR           deploy a model directory on Ray Serve (OpenAI-compatible HTTP)
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> "module:function"; each function takes the remaining argv and returns an exit code.
COMMANDS = {
    "corpus": ("aigc.corpus_cli:main", "write the embedded commerce corpus"),
    "report": ("aigc.report:main", "regenerate a search report"),
    "serve": ("aigc.serving:main", "serve a model directory over HTTP"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="aigc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    args, rest = parser.parse_known_args(argv[:1])
    module, func = COMMANDS[args.command][0].split(":")
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
