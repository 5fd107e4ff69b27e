"""The networks of co-advise; importing this registers them with timm."""
from . import civt, rednet  # noqa: F401  (registration side effect)
from .civt import CivT
from .involution import Involution
from .checkpoints import load_checkpoint_file, match_layout
from .rednet import RedNet

__all__ = ["CivT", "Involution", "RedNet", "load_checkpoint_file", "match_layout"]
