"""`python -m benchmarks` runs `make bench`'s benchmark."""

import sys

from benchmarks.bench import main

sys.exit(main())
