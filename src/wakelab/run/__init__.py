"""One training run: prepare, open, build, train, finish, close, with the trainer bridge, evaluation, stopping and
ranks. Run layer."""
