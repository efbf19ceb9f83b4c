"""Model definitions used by the recipes (importable once ``recipes/`` is on ``sys.path``)."""
