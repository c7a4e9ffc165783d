"""The `freezetune` command line: one module per command, and the table that lists them (``main``)."""
