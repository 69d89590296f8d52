"""A stand-in job for tests/unit/test_cli_runner.py: `python -m tests.helpers.rank_probe ACTION [ARG]`.

Prints its rank and world size, then: `exit N` exits with N; `raise` raises; `fail-on-rank R N` exits with N on
rank R and sleeps on the others (a rank that fails while the rest would wait in a collective).
"""
from __future__ import annotations

import os
import sys
import time


def main(action: str, *args: str) -> None:
    rank = os.environ.get("RANK", "-")
    print(f"rank {rank} of {os.environ.get('WORLD_SIZE', '-')}", flush=True)
    if action == "exit":
        sys.exit(int(args[0]))
    if action == "raise":
        raise RuntimeError("the probe failed on purpose")
    if action == "fail-on-rank":
        if rank == args[0]:
            sys.exit(int(args[1]))
        time.sleep(600)


if __name__ == "__main__":
    main(*sys.argv[1:])
