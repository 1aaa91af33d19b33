"""`python -m lorafleet_local`: the same as the `lorafleet-local` command."""

import sys

from lorafleet_local.cli import main

sys.exit(main())
