"""swav_core: a small, tested, pure-PyTorch SwAV (Caron et al., 2020) and fmcib's SwaV model."""
from .heads import SwaVProjectionHead, SwaVPrototypes
from .loss import SwaVLoss
from .memory_bank import MemoryBankModule
from .model import SwaV
from .multicrop import MultiCrop
from .sinkhorn import sinkhorn

__all__ = [
    "MemoryBankModule",
    "MultiCrop",
    "SwaV",
    "SwaVLoss",
    "SwaVProjectionHead",
    "SwaVPrototypes",
    "sinkhorn",
]
__version__ = "0.1.0"
