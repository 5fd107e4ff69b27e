"""The networks of co-advise; importing this registers them with timm."""
from . import civt, rednet  # noqa: F401  (registration side effect)
from .civt import CivT
from .involution import Involution
from .rednet import RedNet, remap_mmcls_keys

__all__ = ["CivT", "Involution", "RedNet", "remap_mmcls_keys"]
