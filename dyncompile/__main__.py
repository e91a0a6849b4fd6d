"""`python -m dyncompile …`: the same command line as `dyncompile …`."""

from dyncompile.cli import main

main()
