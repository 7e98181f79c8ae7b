import sys
from pathlib import Path

# The helpers module sits beside the tests (no package: test folders have no __init__.py).
sys.path.insert(0, str(Path(__file__).parent))
