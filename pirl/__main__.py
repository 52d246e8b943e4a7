import sys

from pirl.cli import main

sys.exit(main())
