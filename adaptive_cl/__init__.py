"""adaptive-cl: AdaptiveRec's threshold-adaptive InfoNCE, fused, for sequential recommendation."""

from .contract import LossOptions
from .functional import adaptive_info_nce
from .module import AdaptiveInfoNCE
from .stats import LossStats, histogram_percentile, similarity_histogram

__all__ = ["adaptive_info_nce", "AdaptiveInfoNCE", "LossOptions", "LossStats", "histogram_percentile",
           "similarity_histogram"]
__version__ = "0.1.0"
