"""The tiny test model: Hugging Face layout that mlx_lm accepts, deterministic build."""

import json

import pytest
from conftest import PY, REPO, run

from course_lib import models
from course_lib import tiny_model as tm


def test_tiny_model_is_a_mistral_in_hugging_face_layout(tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["model_type"] == "mistral"
    assert config["architectures"] == ["MistralForCausalLM"]
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "build_info.json"):
        assert (tiny_model / name).is_file(), name
    info = json.loads((tiny_model / "build_info.json").read_text())
    assert 1e6 < info["parameters"] < 1e7  # "a few million"
    assert info["pretraining"]["final_loss"] < info["pretraining"]["first_loss"] - 1.0
    assert info["total_seconds"] > 0


def test_tokenizer_is_lossless_and_has_the_mistral_chat_template(tiny_model):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tiny_model)
    text = "Arr, matey! Ye be sailin' 3.5 knots — ñ and 🦜 too."
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy"}],
        tokenize=False)
    assert rendered == "<s>[INST] Hi [/INST] Ahoy</s>"
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], return_dict=False)
    assert ids[0] == tok.bos_token_id and tok.convert_ids_to_tokens(ids[-1]) == "[/INST]"


@pytest.mark.slow
def test_mlx_lm_lora_and_generate_accept_it(tiny_model, tmp_path):
    run([PY, "-m", "mlx_lm", "lora", "--model", tiny_model, "--train",
         "--data", REPO / "data-sets" / "pirate", "--iters", "2", "--batch-size", "2",
         "--num-layers", "2", "--val-batches", "1", "--steps-per-eval", "100",
         "--adapter-path", tmp_path])
    assert (tmp_path / "adapters.safetensors").is_file()
    proc = run([PY, "-m", "mlx_lm", "generate", "--model", tiny_model,
                "--adapter-path", tmp_path, "--prompt", "Name a sea.", "--max-tokens", "8"])
    assert proc.stdout.strip()


def test_build_is_deterministic_for_a_seed(tmp_path):
    small = tm.Recipe(steps=3, warmup_steps=1, batch_size=4, max_seq_length=64)
    run_build = lambda out, recipe: tm.build(out, recipe, log=lambda m: None)  # noqa: E731
    run_build(tmp_path / "a", small)
    run_build(tmp_path / "b", small)
    run_build(tmp_path / "c", tm.Recipe(**{**small.__dict__, "seed": 1}))
    weights = {k: (tmp_path / k / "model.safetensors").read_bytes() for k in "abc"}
    assert weights["a"] == weights["b"]
    assert weights["a"] != weights["c"]
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_cache_location_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_LIB_CACHE", str(tmp_path))
    path = tm.tiny_model_path()
    assert path.parent == tmp_path / "models" and path.name.startswith("tiny-mistral-")
    assert models.smollm2_path("4bit").parent == tmp_path / "models"
    assert tm.recipe_id() != tm.recipe_id(tm.Recipe(seed=1))


def test_bad_pretraining_corpus_line_is_named(tmp_path):
    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"instruction": "a", "context": "", "plain_response": "b"}\n{"oops"\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl:2: bad pretraining record"):
        tm.load_corpus(bad)


def test_pretraining_corpus_holds_no_validation_row():
    """Validation measures rows the tiny model never saw, in pretraining either."""
    valid = [json.loads(line)["messages"][0]["content"]
             for line in (REPO / "data-sets" / "pirate" / "valid.jsonl").open()]
    seen = {r["messages"][0]["content"] for r in tm.load_corpus()}
    assert len(valid) == 78 and len(seen) == 322
    assert not seen & set(valid)
