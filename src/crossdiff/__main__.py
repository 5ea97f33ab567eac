"""`python -m crossdiff` runs the command line."""

from crossdiff.cli import main

main()
