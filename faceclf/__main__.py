"""`python -m faceclf` is the same as the `faceclf` command."""

import sys

from faceclf.cli import main

sys.exit(main())
