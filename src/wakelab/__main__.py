"""``python -m wakelab``: the CLI, also the form ``torchrun -m wakelab run ...`` launches."""

from .cli.main import main

main()
