"""Progress bars: on stderr, cleared when done, tqdm imported only when one is shown."""

from __future__ import annotations

import sys
from typing import Any


def bar(total: int, desc: str, unit: str, enabled: bool = True) -> Any:
    """A tqdm bar of `total` steps, or None when disabled or there is nothing to count."""
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
