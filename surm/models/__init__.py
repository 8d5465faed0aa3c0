"""Models behind one interface, by name, and the project's own Flax models with their loaders.

    entry = models.get("vit")            # unknown name -> ValueError listing the known ones
    module, params, example_inputs = entry.build(config.model, num_classes, rng)
    entry.modality, entry.input_keys, entry.inputs(batch), entry.save(folder, run, params)
    models.register(MyEntry())           # bring your own (a `ModelEntry` subclass)

The registry and the interface: `surm.models.registry`. Built in (`surm.models.factory`):

    vit    ViT as in google-research/vision_transformer (`.npz` checkpoints)
    bert   BERT as in Hugging Face (`config.json` + `model.safetensors` folders)

Each family module (`vit`, `bert`) holds its config dataclass, its Flax module, its `load()`
and `save()`.
"""
from surm.models.registry import ModelEntry, get, is_causal_lm, names, register
from surm.models import factory  # registers the built-in models  # noqa: F401
