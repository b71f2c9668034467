#!/usr/bin/env python3
"""UCAD command line (see README.md): run_ucad.py [options] RESULTS_PATH ucad ... sampler ... dataset ..."""
from ucad.cli import entry

if __name__ == "__main__":
    entry()
