"""Measurement hook, not used by fedft: put this folder first on ``PYTHONPATH`` of a
``fedft server`` and its ServerApp (``flwr-serverapp``) pulls a reply's objects with Flower's
backoff starting at 0.1 s (cap 0.5 s) instead of 1 s (cap 10 s). docs/deploy.md uses it to
show where a deployed round's time after the clients' replies goes."""

import os
import sys

if os.path.basename(sys.argv[0] if sys.argv else "") == "flwr-serverapp":
    import functools

    from flwr.superlink.grid import http_grid

    http_grid.pull_objects = functools.partial(
        http_grid.pull_objects, initial_backoff=0.1, backoff_cap=0.5
    )
