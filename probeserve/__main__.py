import sys

from probeserve.cli import main

sys.exit(main())
