"""Progress bars on stderr, so long loads and writes show they are alive without polluting stdout."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(total=None, desc="", unit="it", unit_scale=False, disable=False):
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        disable=disable,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
    )
