"""``python -m riskcontrol [STEP]``: data -> features -> train -> evaluate -> score -> online (template.py)."""
from .template import TEMPLATE

if __name__ == "__main__":
    TEMPLATE.exit()
