"""``python -m pcb_aoi.lifecycle`` = ``pcb-aoi-registry``."""
import sys

from .cli import main

sys.exit(main())
