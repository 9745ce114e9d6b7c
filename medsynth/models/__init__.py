"""Base text-to-image models: loading (Hugging Face id, local diffusers dir, or the tiny base).

``medsynth.models.loading`` is the one entry point every stage uses; ``medsynth.models.tiny``
builds the small offline PixArt-layout base (``model.base: tiny``). Both import torch, so this
package file stays empty of imports: ``import medsynth.models`` is cheap.
"""
