"""Install the real Triton Inference Server (from the nvidia-pytriton wheel) and the model environment under .triton/.

    python scripts/install_tritonserver.py [--home DIR]   (default: .triton in the checkout; for an installed
    package ~/.cache/orthrus-export/triton)
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orthrus_export.tritonserver import HOME, install, server_binary  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", default=str(HOME))
    home = install(Path(ap.parse_args().home), quiet=False)
    print(f"tritonserver: {server_binary(home)}")
