"""``python -m hhdata.cli``: the hhdata command, as the installed ``hhdata`` script runs it."""

import sys

from hhdata.cli import main

sys.exit(main())
