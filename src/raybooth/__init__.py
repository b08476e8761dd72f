"""raybooth: DreamBooth training on Ray Train and Stable Diffusion serving on Ray Serve."""

__version__ = "0.1.0"
