import sys

from pairmill.cli import main

sys.exit(main())
