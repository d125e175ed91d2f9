from .distribution import frechet_distance, radial_log_spectrum, temporal_consistency
from .quality import psnr, ssim

__all__ = ["frechet_distance", "psnr", "radial_log_spectrum", "ssim", "temporal_consistency"]
