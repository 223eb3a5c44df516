"""Turn measured figures into plain JSON values, once for every package.

Figures come from numpy (scalars and arrays) and from arithmetic that can give NaN or infinity,
neither of which is JSON. `json_safe` converts numpy values to Python ones by duck typing (this
package never imports numpy), tuples to lists, keys JSON cannot encode to strings, and an unavailable figure (NaN,
inf) to None: never a made-up number.
"""

from __future__ import annotations

import json
import math
from typing import Any


def json_safe(obj: Any, *, nonfinite_to_none: bool = True) -> Any:
    """A copy of `obj` that `json.dumps(..., allow_nan=False)` accepts (with `nonfinite_to_none`).

    `nonfinite_to_none=False` keeps NaN/inf as floats, for callers that write them on purpose.
    """
    if isinstance(obj, float):
        return None if nonfinite_to_none and not math.isfinite(obj) else obj
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    if isinstance(obj, dict):
        return {_key(k): json_safe(v, nonfinite_to_none=nonfinite_to_none) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v, nonfinite_to_none=nonfinite_to_none) for v in obj]
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return json_safe(tolist(), nonfinite_to_none=nonfinite_to_none)
    return obj


def _key(key: Any) -> Any:
    """Keys json encodes itself stay as they are (same bytes); others (numpy ints) become strings."""
    return key if key is None or isinstance(key, str | int | float) else str(key)


def dumps_compact(obj: Any) -> bytes:
    """`obj` sanitised and encoded as compact JSON bytes (the wire form)."""
    return json.dumps(json_safe(obj), separators=(",", ":"), allow_nan=False).encode()
