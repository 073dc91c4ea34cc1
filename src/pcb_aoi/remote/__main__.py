"""``python -m pcb_aoi.remote`` = ``pcb-aoi-remote`` (azureml/run.sh and the README call it so)."""
import sys

from .dvc_remote import main

sys.exit(main())
