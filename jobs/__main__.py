"""``python -m jobs nightly [--scope S]``: the same as ``privrank jobs ...``, for crontabs."""

import sys

from server.cli import main

sys.exit(main(["jobs", *sys.argv[1:]]))
