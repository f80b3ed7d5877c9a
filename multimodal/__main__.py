"""``python -m multimodal [STEP]``: sample (only without --input) -> process (see template.py)."""
from .template import TEMPLATE

if __name__ == "__main__":
    TEMPLATE.exit()
