import sys
from pathlib import Path

# helpers shared by tests (crdcheck) are imported as top-level modules
sys.path.insert(0, str(Path(__file__).parent))
