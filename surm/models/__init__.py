"""Flax models whose parameter names match standard checkpoints, and their loaders.

    vit    ViT as in google-research/vision_transformer (`.npz` checkpoints)
    bert   BERT as in Hugging Face (`config.json` + `model.safetensors` folders)

Each family module holds its config dataclass, its Flax module and its `load()`.
"""
from types import ModuleType

from surm.models import bert, vit

MODELS: dict[str, ModuleType] = {"vit": vit, "bert": bert}


def get_model(name: str) -> ModuleType:
    """The family module for `name` ("vit" or "bert")."""
    if name not in MODELS:
        raise ValueError(f"Unknown model family {name!r}; known: {sorted(MODELS)}")
    return MODELS[name]
