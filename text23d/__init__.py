"""text23d: text-to-3D by distilling 2D diffusion models."""
__version__ = "0.1.0"
