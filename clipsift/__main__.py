import sys

from clipsift.cli import main

sys.exit(main())
