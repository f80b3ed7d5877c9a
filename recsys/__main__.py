"""``python -m recsys [STEP]``: data -> retrieval -> ranking -> evaluate -> batch (see template.py)."""
from .template import TEMPLATE

if __name__ == "__main__":
    TEMPLATE.exit()
