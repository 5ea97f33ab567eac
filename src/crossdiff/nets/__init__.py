"""Networks shared by the translation methods (denoisers now; discriminators and autoencoders beside them)."""

from crossdiff.nets.denoiser import DENOISER_DEFAULTS, ConditionalDenoiser, build_denoiser

__all__ = ["DENOISER_DEFAULTS", "ConditionalDenoiser", "build_denoiser"]
