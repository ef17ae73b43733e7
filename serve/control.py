"""kestrel models: the repository of a running server, and loading or unloading its models.

    kestrel models list                         # every model version the server knows: state and reason
    kestrel models list --ready                 # only those that serve
    kestrel models load mobilenet_v2            # load or reload; returns once it serves (or says why not)
    kestrel models load mobilenet_v2 --force    # reload versions whose files did not change
    kestrel models load mobilenet_v2 --config cfg.json   # a JSON ModelConfig instead of config.pbtxt
    kestrel models unload imagenet --unload-dependents   # an ensemble and the members loaded with it

The server must run with --model-control-mode explicit for load and unload; with --auth-tokens, pass a
token with the control role (--token, or $KESTREL_TOKEN). Over gRPC (the port `kestrel serve --port`
opened; tritonclient's load_model / unload_model / get_model_repository_index call the same RPCs).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from . import console
from .client import DEFAULT_ADDRESS, KestrelClient
from .errors import KestrelError


def format_index(rows: list[dict]) -> str:
    """The repository index as a text table."""
    if not rows:
        return "(the repository holds no models)"
    header = ("MODEL", "VERSION", "STATE", "REASON")
    lines = [header] + [(r["name"], r["version"] or "-", r["state"], r["reason"]) for r in rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in lines)


def build_parser() -> argparse.ArgumentParser:
    def connection(parser, defaults: bool) -> None:
        """The server's address and credentials: before the action or after it (`models list --token T`)."""
        default = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)
        parser.add_argument("--address", default=default(DEFAULT_ADDRESS),
                            help=f"server host:port (default {DEFAULT_ADDRESS})")
        parser.add_argument("--token", default=default(os.environ.get("KESTREL_TOKEN")),
                            help="bearer token (the server runs with --auth-tokens; default: $KESTREL_TOKEN)")
        parser.add_argument("--tls-ca", type=Path, default=default(None),
                            help="CA certificate to trust (the server uses TLS)")
        parser.add_argument("--timeout", type=float, default=default(300.0),
                            help="seconds a call may take (a load returns once the model serves; default 300)")

    parser = argparse.ArgumentParser(prog="kestrel models", description=(
        "List, load and unload the models of a running Kestrel server (the repository extension, over gRPC)."))
    connection(parser, defaults=True)
    actions = parser.add_subparsers(dest="action", required=True, metavar="list|load|unload")
    listing = actions.add_parser("list", help="every model version the server knows, with state and reason")
    connection(listing, defaults=False)
    listing.add_argument("--ready", action="store_true", help="only the versions that serve")
    load = actions.add_parser("load", help="load or reload a model or ensemble (returns once it serves)")
    connection(load, defaults=False)
    load.add_argument("name")
    load.add_argument("--force", action="store_true", help="reload versions whose files did not change")
    load.add_argument("--config", type=Path, metavar="FILE",
                      help="a JSON model configuration (ModelConfig) to load with instead of config.pbtxt")
    unload = actions.add_parser("unload", help="unload a model or ensemble (returns once its requests are answered)")
    connection(unload, defaults=False)
    unload.add_argument("name")
    unload.add_argument("--unload-dependents", action="store_true",
                        help="an ensemble: its members loaded with it too")
    return console.add_examples(parser, "list", "load mobilenet_v2", "unload mobilenet_v2 --address 10.0.0.5:8001 "
                                "--token $TOKEN")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = None
    if getattr(args, "config", None) is not None:
        try:
            config = args.config.read_text()
        except OSError as exc:
            print(f"error: cannot read {args.config}: {exc.strerror}", file=sys.stderr)
            return 1
    try:
        with KestrelClient(args.address, tls_ca=args.tls_ca, timeout=args.timeout, token=args.token) as client:
            if args.action == "list":
                print(format_index(client.repository_index(ready=args.ready)))
            elif args.action == "load":
                client.load_model(args.name, config=config, force=args.force)
                print(f"{args.name}: loaded")
                print(format_index([r for r in client.repository_index() if r["name"] == args.name]))
            else:
                client.unload_model(args.name, unload_dependents=args.unload_dependents)
                print(f"{args.name}: unloaded")
    except KestrelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
