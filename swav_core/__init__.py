"""swav_core: a small, tested, pure-PyTorch SwAV (Caron et al., 2020) and fmcib's SwaV model."""
import warnings

with warnings.catch_warnings():  # torch warns at import when numpy, optional here, is missing
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401
from .heads import SwaVProjectionHead, SwaVPrototypes
from .loss import SwaVLoss
from .memory_bank import MemoryBankModule
from .model import SwaV
from .multicrop import MultiCrop
from .sinkhorn import sinkhorn

__all__ = ["MemoryBankModule", "MultiCrop", "SwaV", "SwaVLoss", "SwaVProjectionHead", "SwaVPrototypes", "sinkhorn"]
__version__ = "0.1.0"
