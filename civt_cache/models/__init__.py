"""The networks of co-advise; importing this registers them with timm."""
from civt_cache.models.checkpoints import load_checkpoint_file, match_layout
from civt_cache.models.civt import CivT
from civt_cache.models.involution import Involution
from civt_cache.models.rednet import RedNet

from . import civt, rednet  # noqa: F401  (registration side effect)

__all__ = ["CivT", "Involution", "RedNet", "load_checkpoint_file", "match_layout"]
