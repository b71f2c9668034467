#!/usr/bin/env python3
"""UCAD command line (see README.md): run_ucad.py [options] RESULTS_PATH ucad ... sampler ... dataset ..."""
import sys


def main() -> None:
    """The command line; Ctrl-C while torch and the backbones load (the first seconds) ends with one line."""
    try:
        from ucad.cli.run import main as command_line
    except KeyboardInterrupt:
        print("interrupted while starting, before anything was read or written", file=sys.stderr)
        sys.exit(130)
    command_line()


if __name__ == "__main__":
    main()
