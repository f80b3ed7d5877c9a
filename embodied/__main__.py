"""``python -m embodied [STEP]``: collect -> train -> evaluate (see template.py)."""
from .template import TEMPLATE

if __name__ == "__main__":
    TEMPLATE.exit()
