"""``python -m fluidsrv``: the same as the ``fluidsrv`` command."""

import sys

from fluidsrv.cli import main

sys.exit(main())
