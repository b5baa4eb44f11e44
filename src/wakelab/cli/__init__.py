"""The command line: one module per command, the shared run options in ``options``. App layer."""
