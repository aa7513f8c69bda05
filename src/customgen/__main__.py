"""`python -m customgen` runs the CLI."""
import sys

from customgen.cli import main

sys.exit(main())
