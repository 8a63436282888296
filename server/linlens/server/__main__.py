"""``python -m linlens.server``: run the gRPC server (flags: ``--help``)."""

import sys

from linlens.server.logs import quiet_progress_bars

quiet_progress_bars()  # before torch and transformers are imported

from linlens.server.app import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
