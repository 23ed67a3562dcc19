"""`python -m fednode` is the `fedchain` command."""
import sys

from .ops.cli import main

sys.exit(main())
