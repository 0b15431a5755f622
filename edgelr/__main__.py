import sys

from edgelr.cli import main

sys.exit(main())
