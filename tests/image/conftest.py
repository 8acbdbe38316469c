"""The image test runs from `make image-test` (which builds the image and sets IGW_IMAGE), not in `make test`."""

from __future__ import annotations

import os
from pathlib import Path


def pytest_ignore_collect(collection_path: Path, config: object) -> bool | None:
    if collection_path.name.startswith("test_") and not os.environ.get("IGW_IMAGE"):
        return True
    return None
