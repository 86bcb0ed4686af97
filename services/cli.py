"""The `biogate` command line: serve, migrate, models, keys, audit, purge, eval/calibrate, admin, kiosk and client."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from services.settings import Settings, load_config
from services.common.logs import setup_logging

# Command groups implemented next to the code they drive; each module has register(subparsers).
COMMAND_MODULES = (
    "services.serve",
    "services.migrate",
    "services.commands.models",
    "services.commands.keys",
    "services.commands.audit",
    "services.commands.retention",
    "services.commands.evaluation",
    "services.admin",
    "services.commands.voice",
    "services.kiosk.server",
    "biogate_client.cli",  # `biogate client ...`: the client SDK's flows against running services
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="biogate", description="BioGate biometric verification platform")
    parser.add_argument("--config", help="YAML configuration file (default: $BIOGATE_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings: Settings = load_config(args.config)
    setup_logging(settings.logging.level, settings.logging.json_format, service=getattr(args, "service", args.command))
    try:
        return int(args.func(settings, args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a command-line user gets one clear line, the log keeps the trace
        logging.getLogger("biogate.cli").debug("command failed", exc_info=True)
        print(f"biogate {args.command}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
