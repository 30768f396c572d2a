from __future__ import annotations

import sys

from modify.cli import main

sys.exit(main())
