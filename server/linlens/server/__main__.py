"""``python -m linlens.server``: run the gRPC server (flags: ``--help``)."""

import sys

from linlens.server.app import main

if __name__ == "__main__":
    sys.exit(main())
