"""`aigc` command line: thin subcommands that call into the library.

    aigc corpus --out DIR            write the embedded train/validation/test corpus
    aigc report SEARCH_DIR           (re)generate the search report of a finished or partial search
    aigc serve --model DIR           deploy a model directory on Ray Serve (OpenAI-compatible HTTP)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

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


def config_job(argv: list[str] | None, doc: str | None, model: type, run: str, *, config_help: str,
               example: str) -> tuple[Any, Any] | None:
    """What jobs/finetune.py, tune/search.py and jobs/pipeline.py share: parse `--config FILE [a.b=value ...]`,
    validate the whole config before Ray starts, then call `run` ("module:function") with it.

    Returns (config, result); on a user error (config, data, model directory) prints `error: ...` to stderr
    and returns None, for the caller to exit 2."""
    from aigc.config import ConfigError, load_config
    from aigc.data import DataError
    from aigc.modeldir import ModelDirError

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=config_help)
    p.add_argument("overrides", nargs="*", help=f"section.key=value overrides, e.g. {example}")
    args = p.parse_args(argv)
    try:
        cfg = load_config(model, args.config, args.overrides)
        module, func = run.split(":")  # imports Ray: only once the config is known to be good
        return cfg, getattr(importlib.import_module(module), func)(cfg)
    except (ConfigError, DataError, ModelDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None


if __name__ == "__main__":
    sys.exit(main())
