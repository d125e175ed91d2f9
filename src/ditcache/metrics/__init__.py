from .distribution import frechet_distance, temporal_consistency
from .quality import psnr, ssim

__all__ = ["frechet_distance", "psnr", "ssim", "temporal_consistency"]
