import sys

from idode.cli import main

sys.exit(main())
