"""Finds the CUTLASS / CuTe headers: $CUTLASS_DIR if set, else the nvidia-cutlass wheel.

Used by setup.py (imported) and CMakeLists.txt (run as a script, prints the include directory).
"""

from __future__ import annotations

import os
from pathlib import Path

REQUIRED_HEADER = Path("cutlass") / "gemm" / "device" / "gemm_batched.h"


def cutlass_include_dir() -> Path:
    override = os.environ.get("CUTLASS_DIR")
    if override:
        for candidate in (Path(override) / "include", Path(override)):
            if (candidate / REQUIRED_HEADER).is_file():
                return candidate
        raise FileNotFoundError(f"CUTLASS_DIR={override} holds no {REQUIRED_HEADER} (in it or in its include/)")
    try:
        import cutlass_library
    except ImportError as err:
        raise FileNotFoundError(
            "CUTLASS headers not found: pip install 'nvidia-cutlass>=4.2,<4.3' or set CUTLASS_DIR"
        ) from err
    include = Path(cutlass_library.__file__).parent / "source" / "include"
    if not (include / REQUIRED_HEADER).is_file():
        raise FileNotFoundError(f"the nvidia-cutlass wheel at {include} lacks {REQUIRED_HEADER}")
    return include


if __name__ == "__main__":
    print(cutlass_include_dir())
