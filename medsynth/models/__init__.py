"""Base text-to-image models: the backbone interface, loading, and one module per family.

``medsynth.models.backbone`` is the interface every stage uses (family detection, registry);
``medsynth.models.loading`` loads any base (Hugging Face id, local diffusers dir, or the tiny
base); ``medsynth.models.pixart`` is the PixArt family and ``medsynth.models.tiny`` builds its
small offline base (``model.base: tiny``). They import torch, so this package file stays empty of
imports: ``import medsynth.models`` is cheap.
"""
