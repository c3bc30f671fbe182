"""Experiment configs (``*.toml``) and the ``fedft simulate`` recipe."""
