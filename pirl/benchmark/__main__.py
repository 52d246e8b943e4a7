import sys

from pirl.benchmark.cli import main

sys.exit(main())
