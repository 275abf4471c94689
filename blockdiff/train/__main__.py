"""``python -m blockdiff.train ...`` is ``blockdiff train ...``: the same one-line errors (not tracebacks), exit
statuses, ``--log-level`` and ``--quiet``."""

import sys

from ..cli import main

sys.exit(main(["train", *sys.argv[1:]]))
