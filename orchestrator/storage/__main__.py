"""Sync on the instance: `python -m orchestrator.storage pull SRC DST --cache DB [--creds-stdin]`.

Credentials arrive as JSON on stdin (never on the command line, never logged). Prints
one JSON object: the SyncResult, or {"error": ...} with exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cache import TransferCache
from .stores import StorageError
from .sync import make_s3_client, pull, push


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.storage")
    parser.add_argument("direction", choices=["pull", "push"])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--creds-stdin", action="store_true")
    parser.add_argument("--exclude", action="append", default=[], help="push: leave out paths matching this glob")
    args = parser.parse_args()
    creds = json.loads(sys.stdin.read() or "{}") if args.creds_stdin else {}
    cache = TransferCache(Path(args.cache).expanduser())
    factory = (lambda: make_s3_client(credentials=creds)) if creds else None
    try:
        if args.direction == "pull":
            result = pull(args.src, args.dst, cache, client_factory=factory, credentials=creds or None)
        else:
            result = push(Path(args.src).expanduser(), args.dst, cache, client_factory=factory, exclude=args.exclude)
    except StorageError as e:
        print(json.dumps({"error": str(e)}))
        sys.exit(1)
    print(json.dumps(result.as_json()))


if __name__ == "__main__":
    main()
