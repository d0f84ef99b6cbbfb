"""Make ``import torchvision`` work when its compiled ops cannot be loaded.

open_clip and timm import ``torchvision.transforms`` at import time. The torchvision wheels on
PyPI are built against a CUDA torch; next to a CPU-only torch their compiled extension fails to
load, which torchvision tolerates, except that its fake-tensor registrations for
``torchvision::nms`` and ``torchvision::qnms`` then raise
``RuntimeError: operator torchvision::nms does not exist`` and the whole package import fails.

:func:`ensure_torchvision_importable` first tries the plain import. Only if that fails with a
missing ``torchvision::<op>`` operator does it declare the missing op schemas in a
``torch.library.Library("torchvision", "FRAGMENT")`` and import again, repeating until the
import succeeds. The declared ops have no kernels: the pure-Python parts of torchvision
(transforms, model definitions) work, its compiled ops (``torchvision.ops.nms`` and friends)
raise when called. megatron-vlm only needs the former, so a shimmed import is recorded at DEBUG
level: on every start of a tool that reads images it would be a line nobody can act on (and a
call into ``torchvision.ops`` names the missing kernel itself).
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
import threading
from typing import List, Optional

import torch

logger = logging.getLogger("megatron_vlm")

# Schemas of the ops torchvision registers fake kernels for unconditionally.
_KNOWN_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")
_MAX_ATTEMPTS = 32

_lock = threading.Lock()
_fragment: Optional["torch.library.Library"] = None  # kept alive: dropping it removes the schemas
_defined_ops: List[str] = []


def shim_applied() -> bool:
    """True when this process declared placeholder torchvision op schemas."""
    return bool(_defined_ops)


def _op_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def _define_op(name: str) -> None:
    global _fragment
    if _op_exists(name):
        return
    if _fragment is None:
        _fragment = torch.library.Library("torchvision", "FRAGMENT")
    schema = _KNOWN_SCHEMAS.get(name, f"{name}(Tensor[] inputs) -> Tensor")
    _fragment.define(schema)
    _defined_ops.append(name)


def _forget_partial_import() -> None:
    """Drop the half-imported torchvision modules so the next import starts afresh."""
    for mod_name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod_name]


def ensure_torchvision_importable() -> None:
    """Import ``torchvision`` and ``torchvision.transforms``, declaring missing op schemas if needed.

    Safe to call many times and from several threads; does nothing once torchvision is imported.
    Raises ``ImportError`` if torchvision is not installed and re-raises any import failure that
    is not a missing ``torchvision::`` operator.
    """
    with _lock:
        tv = sys.modules.get("torchvision")
        if tv is not None and getattr(tv, "transforms", None) is not None:
            return
        first_error: Optional[BaseException] = None
        for _ in range(_MAX_ATTEMPTS):
            try:
                importlib.import_module("torchvision")
                importlib.import_module("torchvision.transforms")
                break
            except RuntimeError as exc:
                match = _MISSING_OP.search(str(exc))
                if match is None:
                    raise
                if first_error is None:
                    first_error = exc
                name = match.group(1)
                if name in _defined_ops:
                    # Declaring it did not help: give up with the original error.
                    raise RuntimeError(
                        f"torchvision still fails to import after declaring torchvision::{name}: {exc}"
                    ) from first_error
                _forget_partial_import()
                if not _defined_ops:
                    for known in _KNOWN_SCHEMAS:
                        _define_op(known)
                _define_op(name)
        else:
            raise RuntimeError(
                f"torchvision did not import after declaring {_MAX_ATTEMPTS} missing op schemas "
                f"({', '.join(_defined_ops)})"
            ) from first_error
        if _defined_ops:
            logger.debug(
                "torchvision %s could not load its compiled ops beside torch %s; declared placeholder "
                "op schemas (%s) so torchvision.transforms imports (torchvision.ops kernels are unavailable)",
                getattr(sys.modules["torchvision"], "__version__", "?"),
                torch.__version__,
                ", ".join(f"torchvision::{n}" for n in _defined_ops),
            )
