"""``python -m hcx``: the same as the ``hcx`` command."""

import sys

from hcx.cli import main

sys.exit(main())
