import sys

from linlens.cli.main import main

sys.exit(main())
