"""medsynth: class-labelled synthetic 2D medical images with Med-Art (PixArt-alpha + LoRA + HLDF)."""

__version__ = "0.1.0"
