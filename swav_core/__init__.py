"""swav_core: a small, tested, pure-PyTorch SwAV (Caron et al., 2020) and fmcib's SwaV model."""
import warnings

with warnings.catch_warnings():  # torch warns at import when numpy, optional here, is missing
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401
from .health import embedding_std, pred_entropy, prototype_usage, training_health
from .heads import SwaVProjectionHead, SwaVPrototypes
from .loss import SwaVLoss
from .memory_bank import MemoryBankModule
from .model import SwaV
from .multicrop import MultiCrop
from .sinkhorn import sinkhorn

__all__ = ["MemoryBankModule", "MultiCrop", "SwaV", "SwaVLoss", "SwaVProjectionHead", "SwaVPrototypes", "embedding_std",
           "pred_entropy", "prototype_usage", "sinkhorn", "training_health"]
__version__ = "0.1.0"
