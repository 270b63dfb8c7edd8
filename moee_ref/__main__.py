"""`python -m moee_ref`: the `moee` command line."""

import sys

from .cli.main import main

sys.exit(main())
