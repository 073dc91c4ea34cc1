"""``python -m pcb_aoi.review`` = ``pcb-aoi-review``, kept for the README's command; the code lives in
``pcb_aoi.evaluation.review``."""
from .evaluation.review import main

if __name__ == "__main__":
    main()
