import sys

from .cli import main

if __name__ == "__main__":  # guarded: spawned ranks (blockdiff.distributed) import the main module
    sys.exit(main())
