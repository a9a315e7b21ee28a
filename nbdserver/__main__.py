"""``python -m nbdserver``: the same as the ``nbdserver`` console script."""

import sys

from nbdserver.cli import main

sys.exit(main())
