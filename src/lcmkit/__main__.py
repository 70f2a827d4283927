import sys

from lcmkit.app.cli import main

sys.exit(main())
