"""One module per benchmark section; each has ``run(rep, cfg)`` (see bench.py)."""
