"""freezetune's service: config -> data, models -> training, tracking -> demo, reporting -> jobs -> cli.

Each subpackage imports only from those before it in that order (``tests/test_layers.py`` checks it).
"""
