"""``python -m pcb_aoi.report`` = ``pcb-aoi-report``."""
import sys

from .cli import main

sys.exit(main())
