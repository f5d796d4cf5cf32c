"""`python -m edgeslim` = the `edgeslim` command."""
import sys

from edgeslim.cli import main

sys.exit(main())
