"""adaptive-cl: AdaptiveRec's threshold-adaptive InfoNCE, fused, for sequential recommendation."""

from .contract import LossOptions
from .functional import adaptive_info_nce
from .module import AdaptiveInfoNCE

__all__ = ["adaptive_info_nce", "AdaptiveInfoNCE", "LossOptions"]
__version__ = "0.1.0"
