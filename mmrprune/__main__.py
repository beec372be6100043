"""``python -m mmrprune info [--json]``."""
import argparse
import json
import sys

from .info import info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmrprune")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="backends of this installation and why any is unavailable")
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.command == "info":
        report = info()
        print(json.dumps(report, indent=2) if args.json else report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
