import sys

from avfast.cli import main

sys.exit(main())
