"""Hydra configs of selfflow, installed as the package `selfflow.conf` (the folder is `conf/` in
the repository)."""
