import sys

from lowerlm.cli import main

sys.exit(main())
