"""The data path: exact token ids and label masks, file formats, errors, and packing that keeps
examples apart (a token's logits packed == its logits alone)."""
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import DataCollatorWithFlattening

from efft.config import DataConfig
from efft.data import (IGNORE_INDEX, encode_chat, encode_instruction, load_dataset_from_config, make_collator,
                       pack_examples, packing_problem)
from efft.model import load_model
from efft.tokenizer import byte_tokenizer

IM_START, IM_END = 256, 257
M = IGNORE_INDEX


def b(s: str) -> list[int]:
    return list(s.encode("utf-8"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"instruction": f"Add {a} and {c}.", "input": "", "output": f"Answer: {a + c}"} for a in range(4) for c in range(5)]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


# ------------------------------------------------------------------------------------ label masking
def test_instruction_masking_exact_ids(tok):
    out = encode_instruction(tok, "Add 2 and 3.", None, "Answer: 5")
    prompt = [IM_START] + b("user\nAdd 2 and 3.") + [IM_END] + b("\n") + [IM_START] + b("assistant\n")
    answer = b("Answer: 5") + [IM_END]
    assert out["input_ids"] == prompt + answer + b("\n")
    assert out["labels"] == [M] * len(prompt) + answer + [M]


def test_instruction_input_field_joins_the_user_turn(tok):
    out = encode_instruction(tok, "Reverse this word.", "cat", "Answer: tac")
    text = tok.decode(out["input_ids"])
    assert "<|im_start|>user\nReverse this word.\n\ncat<|im_end|>" in text
    assert tok.decode([t for t in out["labels"] if t != M]) == "Answer: tac<|im_end|>"


def test_chat_masking_labels_only_assistant_turns(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    out = encode_chat(tok, msgs)
    expected_ids, expected_labels = [], []
    for m in msgs:
        head = [IM_START] + b(m["role"] + "\n")
        body = b(m["content"]) + [IM_END]
        expected_ids += head + body + b("\n")
        expected_labels += [M] * len(head) + (body if m["role"] == "assistant" else [M] * len(body)) + [M]
    assert out["input_ids"] == expected_ids
    assert out["labels"] == expected_labels
    assert encode_chat(tok, msgs, train_on_prompt=True)["labels"] == expected_ids


def test_plain_template_without_chat_template():
    t = byte_tokenizer()
    t.chat_template = None
    out = encode_instruction(t, "Add 1 and 1.", None, "Answer: 2")
    prompt = b("### Instruction:\nAdd 1 and 1.\n\n### Response:\n")
    assert out["input_ids"] == prompt + b("Answer: 2") + [IM_END]
    assert out["labels"] == [M] * len(prompt) + b("Answer: 2") + [IM_END]


def test_malformed_message_is_named(tok):
    with pytest.raises(ValueError, match=r"message 1 must be a mapping with 'role' and 'content', got \['role', 'text'\]"):
        encode_chat(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "text": "b"}])


# ---------------------------------------------------------------------------------- loading + errors
def cfg(path, **kw):
    return DataConfig(path=str(path), **kw)


def test_dataset_columns_masking_and_truncation(tok, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ROWS)
    train, ev = load_dataset_from_config(cfg(p, max_seq_length=64), tok)
    assert ev is None and len(train) == len(ROWS) and train.column_names == ["input_ids", "labels"]
    row = train[0]
    assert tok.decode([t for t in row["labels"] if t != M]).startswith("Answer: ")
    # The prompt "<|im_start|>user\nAdd a and c.<|im_end|>\n<|im_start|>assistant\n" is 31 tokens:
    # 33 keep two answer tokens; 31 leave no label, so every example is dropped.
    short, _ = load_dataset_from_config(cfg(p, max_seq_length=33), tok)
    assert len(short) == len(ROWS)
    for r in short:
        assert len(r["input_ids"]) == 33 and r["labels"] == [M] * 31 + b("An")
    with pytest.raises(ValueError, match="no example .* has a labelled token within max_seq_length=31"):
        load_dataset_from_config(cfg(p, max_seq_length=31), tok)


def test_train_on_prompt_labels_everything(tok, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ROWS[:3])
    train, _ = load_dataset_from_config(cfg(p, train_on_prompt=True), tok)
    for r in train:
        assert r["labels"] == r["input_ids"]


def test_eval_split_max_examples_and_seed(tok, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ROWS)
    train, ev = load_dataset_from_config(cfg(p, eval_fraction=0.25, max_examples=12), tok)
    assert (len(train), len(ev)) == (9, 3)
    again, _ = load_dataset_from_config(cfg(p, eval_fraction=0.25, max_examples=12), tok, seed=123)
    assert again["input_ids"] == train["input_ids"], "cfg.shuffle_seed, not the training seed, fixes the split"
    other, _ = load_dataset_from_config(cfg(p, eval_fraction=0.25, max_examples=12, shuffle_seed=5), tok)
    assert other["input_ids"] != train["input_ids"]


def test_missing_field_names_field_and_columns(tok, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"'instruction'.*'output'.*the file has fields \['answer', 'question'\]"):
        load_dataset_from_config(cfg(p), tok)
    with pytest.raises(ValueError, match=r"format 'instruction' needs field\(s\) \['instruction', 'output'\]"):
        load_dataset_from_config(cfg(p, format="instruction"), tok)
    train, _ = load_dataset_from_config(cfg(p, prompt_field="question", response_field="answer"), tok)
    assert len(train) == 1


def test_unsupported_file_type(tok, tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("hello")
    with pytest.raises(ValueError, match=r"unsupported file type '.txt'"):
        load_dataset_from_config(cfg(p), tok)


def _write(fmt, tmp_path, rows):
    import datasets

    ds = datasets.Dataset.from_list(rows)
    if fmt == "json":
        p = tmp_path / "d.json"
        p.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        p = write_jsonl(tmp_path / "d.jsonl", rows)
    elif fmt == "parquet":
        p = tmp_path / "d.parquet"
        ds.to_parquet(str(p))
    elif fmt == "csv":
        p = tmp_path / "d.csv"
        ds.to_csv(str(p), index=False)
    elif fmt == "disk":
        p = tmp_path / "saved"
        ds.save_to_disk(str(p))
    else:
        p = tmp_path / "saved_dict"
        datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(p))
    return p


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "csv", "disk", "disk_dict"])
def test_each_file_format_gives_the_same_tokens(fmt, tok, tmp_path):
    rows = [{"instruction": "Add 1 and 2.", "input": "x", "output": "Answer: 3"},
            {"instruction": "Say hi.", "input": "", "output": "Answer: hi"}]
    train, _ = load_dataset_from_config(cfg(_write(fmt, tmp_path, rows), shuffle_seed=0), tok)
    ref = [encode_instruction(tok, r["instruction"], r["input"] or None, r["output"]) for r in rows]
    assert sorted(train["input_ids"]) == sorted(r["input_ids"] for r in ref)


def test_chat_and_text_files(tok, tmp_path):
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}])
    train, _ = load_dataset_from_config(cfg(chat), tok)
    assert tok.decode([t for t in train[0]["labels"] if t != M]) == "Yo<|im_end|>"
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}])
    train, _ = load_dataset_from_config(cfg(text), tok)
    assert train[0]["input_ids"] == train[0]["labels"] == b("abc") + [IM_END]


def test_shipped_quickstart_data_loads_and_is_styled(tok):
    from efft.config import REPO_ROOT

    rows = [json.loads(l) for l in (REPO_ROOT / "data" / "quickstart.jsonl").read_text().splitlines()]
    assert 300 <= len(rows) <= 500
    for r in rows:
        assert set(r) == {"instruction", "input", "output"}
        head, why = r["output"].split("\n")
        assert head.startswith("Answer: ") and why.startswith("Why: ")
    heldout = (REPO_ROOT / "data" / "heldout_prompts.txt").read_text().splitlines()
    assert heldout and not set(heldout) & {r["instruction"] for r in rows}
    train, _ = load_dataset_from_config(cfg(REPO_ROOT / "data" / "quickstart.jsonl", max_seq_length=256), tok)
    assert len(train) == len(rows)


# ------------------------------------------------------------------------------------------ collator
def test_padding_collator(tok):
    feats = [{"input_ids": [1, 2, 3], "labels": [M, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    out = make_collator(tok, SimpleNamespace(packing=False))(feats)
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 258, 258]]
    assert out["labels"].tolist() == [[M, 2, 3], [4, M, M]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="no position_ids"):
        make_collator(tok, SimpleNamespace(packing=True))(feats)


def test_packing_matches_transformers_flattening_collator():
    examples = [{"input_ids": [5, 6, 7], "labels": [M, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]},
                {"input_ids": [10, 11, 12, 13], "labels": [M, M, 12, 13]}]
    rows = pack_examples({k: [e[k] for e in examples] for k in ("input_ids", "labels")}, max_len=9)
    ref = DataCollatorWithFlattening()(examples)
    assert rows["input_ids"] == ref["input_ids"].tolist()
    assert rows["labels"] == ref["labels"].tolist()
    assert rows["position_ids"] == ref["position_ids"].tolist()
    # A row never exceeds max_len; examples are packed in order.
    cols = {k: [e[k] for e in examples] for k in ("input_ids", "labels")}
    assert [len(r) for r in pack_examples(cols, 5)["input_ids"]] == [5, 4]
    assert [len(r) for r in pack_examples(cols, 4)["input_ids"]] == [3, 2, 4]


# ------------------------------------------------------------------------------------------- packing
TINY = {"model_type": "llama", "vocab_size": 272, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_logits_equal_unpacked(attn, tmp_path):
    """Each token's logits in a packed, padded batch equal its logits in its own example: no
    attention crosses an example boundary (a leak would change every later example's logits)."""
    torch.manual_seed(0)
    model, tok = load_model(SimpleNamespace(config=TINY, path=None, builtin=None, tokenizer=None, dtype="float32",
                                            attn_implementation=attn))
    model.train()  # training mode, as in the Trainer (dropout is 0)
    assert packing_problem(model) is None
    rows = [{"instruction": "Add %d and %d." % (a, c), "input": "", "output": "Answer: %d" % (a + c)} for a, c in [(1, 2), (30, 4), (5, 66), (7, 8), (9, 10)]]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    plain, _ = load_dataset_from_config(cfg(p, max_seq_length=128), tok)
    packed, _ = load_dataset_from_config(cfg(p, max_seq_length=128, packing=True), tok)
    assert len(packed) < len(plain) and max(len(r) for r in packed["input_ids"]) <= 128
    batch = make_collator(tok, SimpleNamespace(packing=True))(list(packed))
    assert "attention_mask" not in batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        loss_packed = model(**batch).loss
        singles = [model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in plain]
    # Walk the packed rows and match each example's span with its own forward pass.
    i = 0
    n_labels = 0
    nll = 0.0
    for r, row in enumerate(packed):
        starts = [j for j, pos in enumerate(row["position_ids"]) if pos == 0] + [len(row["input_ids"])]
        for a, z in zip(starts, starts[1:]):
            assert row["input_ids"][a:z] == plain[i]["input_ids"]
            torch.testing.assert_close(logits[r, a:z], singles[i], rtol=1e-5, atol=1e-5)
            lab = torch.tensor(plain[i]["labels"][1:])
            keep = lab != M
            nll += torch.nn.functional.cross_entropy(singles[i][:-1][keep], lab[keep], reduction="sum").item()
            n_labels += int(keep.sum())
            i += 1
    assert i == len(plain)
    assert loss_packed.item() == pytest.approx(nll / n_labels, rel=1e-5)


def test_packing_leaks_when_the_model_uses_a_cache(tmp_path):
    """Why load_model turns config.use_cache off: with it on, transformers ignores packed position_ids."""
    torch.manual_seed(0)
    model, tok = load_model(SimpleNamespace(config=TINY, path=None, builtin=None, tokenizer=None, dtype="float32",
                                            attn_implementation="sdpa"))
    ids = torch.tensor([b("abcd") + b("efgh")])
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    with torch.no_grad():
        alone = model(input_ids=ids[:, 4:]).logits[0]
        packed = model(input_ids=ids, position_ids=pos).logits[0, 4:]
        model.config.use_cache = True
        assert packing_problem(model) is not None
        leaked = model(input_ids=ids, position_ids=pos).logits[0, 4:]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(leaked, alone, atol=1e-3)


def test_template_that_rewrites_earlier_turns_is_refused():
    t = byte_tokenizer()
    t.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match="cannot be located for label masking; set data.train_on_prompt"):
        encode_chat(t, msgs)
    assert encode_chat(t, msgs, train_on_prompt=True)["labels"] == b("2ab")
