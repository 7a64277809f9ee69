#!/usr/bin/env python3
"""Thin entry point for hyperparameter sweeps: ``python launch/sweep.py ARGS`` is
``hpcdeconv sweep ARGS`` (e.g. ``--config configs/sweep_blind.yaml``, ``--collect DIR``)."""

import sys

from hpcdeconv.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
