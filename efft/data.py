"""Datasets for fine-tuning: read a local file, render instruction/chat/text examples, mask prompts.

An example becomes ``input_ids`` + ``labels`` where labels are -100 on every token the model should
not learn to produce (system/user turns, the prompt of an instruction), so the loss is on answers
only. Chat examples are rendered with the tokenizer's own chat template; the template's text is
cut at turn boundaries and each piece tokenized on its own, which is exactly how generation later
sees a prompt (tokenized alone, then continued).

Packing concatenates examples into rows of up to ``max_seq_length`` with ``position_ids`` restarting
at 0 for each example and no ``attention_mask``. transformers (5.x) then builds a block-diagonal
causal mask from the position_ids for eager and sdpa attention (and flash-attention uses them
natively), so examples never attend to each other. That detection is skipped when the forward
pass uses a KV cache, which is why ``efft.model.load_model`` switches ``config.use_cache`` off.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Used when the tokenizer has no chat template (e.g. a model trained without one).
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


# --------------------------------------------------------------------------------------------- read
def read_dataset(path: str | Path):
    """A ``datasets.Dataset`` from a JSON/JSONL/Parquet/CSV file or a ``save_to_disk`` directory."""
    import datasets

    p = Path(path).expanduser()
    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except FileNotFoundError as e:
            raise ValueError(f"data.path: {p} is a directory but not one written by datasets' save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"data.path: {p} holds splits {list(ds)}; efft reads the 'train' split")
            ds = ds["train"]
        return ds
    if not p.is_file():
        raise FileNotFoundError(f"data.path: {p} does not exist")
    builder = FILE_BUILDERS.get(p.suffix.lower())
    if builder is None:
        raise ValueError(f"data.path: {p.name}: unsupported file type {p.suffix!r}; expected one of {sorted(FILE_BUILDERS)} or a save_to_disk directory")
    return datasets.load_dataset(builder, data_files=str(p), split="train")


def detect_format(columns: list[str], cfg) -> str:
    """``cfg.format``, or for ``auto`` the first of chat / instruction / text whose fields exist."""
    fmt = getattr(cfg, "format", "auto")
    need = {
        "chat": [cfg.messages_field],
        "instruction": [cfg.prompt_field, cfg.response_field],
        "text": [cfg.text_field],
    }
    if fmt == "auto":
        for name in ("chat", "instruction", "text"):
            if all(f in columns for f in need[name]):
                return name
        raise ValueError(
            "data: cannot tell the format: expected a chat field "
            f"{cfg.messages_field!r}, instruction fields {cfg.prompt_field!r} + {cfg.response_field!r}, "
            f"or a text field {cfg.text_field!r}; the file has fields {sorted(columns)}"
        )
    if fmt not in need:
        raise ValueError(f"data.format must be auto, instruction, chat or text, got {fmt!r}")
    missing = [f for f in need[fmt] if f not in columns]
    if missing:
        raise ValueError(f"data: format {fmt!r} needs field(s) {missing} but the file has fields {sorted(columns)}")
    return fmt


# ------------------------------------------------------------------------------------------- encode
def _tok(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def user_content(instruction: str, inp: str | None) -> str:
    """An instruction and its optional input as one user message."""
    return f"{instruction}\n\n{inp}" if inp else instruction


def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered chat cut into ``(text, is_assistant_reply)`` pieces.

    Rendering the conversation up to each assistant turn (with and without that turn) gives the
    character span of each reply; the template must render a conversation's prefix as a prefix of
    its text (all common templates do). Trailing whitespace after a reply (ChatML's newline after
    <|im_end|>) is left unlabelled.
    """
    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    cuts: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = render(messages[:i], True), render(messages[: i + 1], False)
        if not (full.startswith(start) and full.startswith(end) and end.startswith(start)):
            raise ValueError(
                "the tokenizer's chat template does not render a conversation's beginning as the beginning "
                "of its text, so assistant turns cannot be located for label masking; set data.train_on_prompt: true "
                "or use a tokenizer whose template does"
            )
        stop = len(start) + len(end[len(start):].rstrip())
        cuts.append((len(start), stop))
    pieces, pos = [], 0
    for a, b in cuts:
        if a > pos:
            pieces.append((full[pos:a], False))
        pieces.append((full[a:b], True))
        pos = b
    if pos < len(full):
        pieces.append((full[pos:], False))
    return pieces


def encode_segments(tokenizer, pieces: list[tuple[str, bool]], train_on_prompt: bool) -> dict:
    ids, labels = [], []
    for text, labelled in pieces:
        t = _tok(tokenizer, text)
        ids += t
        labels += t if (labelled or train_on_prompt) else [IGNORE_INDEX] * len(t)
    return {"input_ids": ids, "labels": labels}


def encode_chat(tokenizer, messages: list[dict], train_on_prompt: bool = False) -> dict:
    """Token ids + labels of a conversation; only assistant turns are labelled (unless train_on_prompt)."""
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            got = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise ValueError(f"data: message {j} must be a mapping with 'role' and 'content', got {got}")
    if getattr(tokenizer, "chat_template", None):
        if train_on_prompt:  # every token is labelled: no need to find the turns
            full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
            return encode_segments(tokenizer, [(full, True)], True)
        return encode_segments(tokenizer, chat_segments(tokenizer, messages), train_on_prompt)
    # No template: only a single user -> assistant exchange maps onto the plain instruction format.
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if roles != ["user", "assistant"]:
        raise ValueError(f"data: the tokenizer has no chat template; without one efft handles a single user -> assistant exchange, got roles {roles}")
    user = next(m["content"] for m in messages if m["role"] == "user")
    reply = next(m["content"] for m in messages if m["role"] == "assistant")
    return encode_plain(tokenizer, user, reply, train_on_prompt)


def encode_plain(tokenizer, prompt: str, response: str, train_on_prompt: bool = False) -> dict:
    """The fallback instruction template (PLAIN_PROMPT), response ended by the eos token."""
    if tokenizer.eos_token_id is None:
        raise ValueError("data: the tokenizer has neither a chat template nor an eos token to end responses with")
    pieces = [(PLAIN_PROMPT.format(instruction=prompt), False), (response, True)]
    out = encode_segments(tokenizer, pieces, train_on_prompt)
    out["input_ids"].append(tokenizer.eos_token_id)
    out["labels"].append(tokenizer.eos_token_id)
    return out


def encode_instruction(tokenizer, instruction: str, inp: str | None, output: str, train_on_prompt: bool = False) -> dict:
    content = user_content(instruction, inp)
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": content}, {"role": "assistant", "content": output}]
        return encode_chat(tokenizer, msgs, train_on_prompt)
    return encode_plain(tokenizer, content, output, train_on_prompt)


def encode_text(tokenizer, text: str) -> dict:
    ids = _tok(tokenizer, text) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    return {"input_ids": ids, "labels": list(ids)}


def _field(ex: dict, name: str) -> str:
    value = ex[name]
    if value is None:
        raise ValueError(f"data: field {name!r} is empty in an example ({ {k: v for k, v in ex.items() if v is not None} })")
    return str(value)


def _encoder(fmt: str, cfg, tokenizer):
    max_len, top = cfg.max_seq_length, bool(getattr(cfg, "train_on_prompt", False))
    inp_field = getattr(cfg, "input_field", None)

    def encode(ex):
        if fmt == "chat":
            msgs = ex[cfg.messages_field]
            if not isinstance(msgs, list):
                raise ValueError(f"data: field {cfg.messages_field!r} must be a list of {{role, content}} messages, got {type(msgs).__name__}")
            out = encode_chat(tokenizer, msgs, top)
        elif fmt == "instruction":
            inp = ex.get(inp_field) if inp_field else None
            out = encode_instruction(tokenizer, _field(ex, cfg.prompt_field), str(inp) if inp else None, _field(ex, cfg.response_field), top)
        else:
            out = encode_text(tokenizer, _field(ex, cfg.text_field))
        return {"input_ids": out["input_ids"][:max_len], "labels": out["labels"][:max_len]}

    return encode


# --------------------------------------------------------------------------------------------- pack
def pack_examples(batch: dict, max_len: int) -> dict:
    """Greedy packing (in order) of tokenized examples into rows of at most ``max_len`` tokens.

    Each example keeps its own positions (0, 1, ...); its first label becomes -100 because in a
    packed row that token would be predicted from the previous example's last token (unpacked it
    is never a target anyway), so the loss is the same packed or not.
    """
    rows = {"input_ids": [], "labels": [], "position_ids": []}
    cur = {"input_ids": [], "labels": [], "position_ids": []}

    def flush():
        if cur["input_ids"]:
            for k in rows:
                rows[k].append(cur[k])
                cur[k] = []

    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        if len(cur["input_ids"]) + len(ids) > max_len:
            flush()
        cur["input_ids"] += ids
        cur["labels"] += [IGNORE_INDEX] + list(labels[1:])
        cur["position_ids"] += list(range(len(ids)))
    flush()
    return rows


# ------------------------------------------------------------------------------------------- public
def load_dataset_from_config(cfg, tokenizer, *, seed: int | None = None):
    """``(train, eval or None)`` tokenized datasets for a ``DataConfig``-like object (duck-typed).

    Columns: ``input_ids``, ``labels`` (and ``position_ids`` when ``cfg.packing``). The rows are
    shuffled with ``cfg.shuffle_seed`` (``seed`` only when cfg has none, so the training seed does
    not move the eval split) before ``max_examples`` and the eval split.
    Examples left without any labelled token (a prompt longer than ``max_seq_length``) are dropped.
    """
    ds = read_dataset(cfg.path)
    # datasets writes map/shuffle caches beside a save_to_disk dataset: keep them in memory instead
    # of writing into the user's directory (files are cached in datasets' own cache as usual).
    mem = Path(cfg.path).expanduser().is_dir()
    fmt = detect_format(ds.column_names, cfg)
    shuffle_seed = getattr(cfg, "shuffle_seed", None)
    seed = shuffle_seed if shuffle_seed is not None else (seed if seed is not None else 0)
    ds = ds.shuffle(seed=seed, keep_in_memory=mem)
    if getattr(cfg, "max_examples", None):
        ds = ds.select(range(min(cfg.max_examples, len(ds))), keep_in_memory=mem)
    n_read = len(ds)
    ds = ds.map(_encoder(fmt, cfg, tokenizer), remove_columns=ds.column_names, desc=f"tokenizing ({fmt})", keep_in_memory=mem)
    ds = ds.filter(lambda ex: any(l != IGNORE_INDEX for l in ex["labels"]), desc="dropping unlabelled", keep_in_memory=mem)
    if len(ds) < n_read:
        log.warning("data: dropped %d of %d examples with no labelled token within max_seq_length=%d",
                    n_read - len(ds), n_read, cfg.max_seq_length)
    if len(ds) == 0:
        raise ValueError(f"data: no example of {cfg.path} has a labelled token within max_seq_length={cfg.max_seq_length}")
    eval_ds = None
    frac = getattr(cfg, "eval_fraction", 0.0) or 0.0
    if frac > 0:
        if len(ds) < 2:
            raise ValueError(f"data.eval_fraction={frac} needs at least 2 examples, got {len(ds)}")
        split = ds.train_test_split(test_size=frac, seed=seed, shuffle=False, keep_in_memory=mem)
        ds, eval_ds = split["train"], split["test"]
    if getattr(cfg, "packing", False):
        pack = lambda b: pack_examples(b, cfg.max_seq_length)  # noqa: E731
        ds = ds.map(pack, batched=True, batch_size=1000, remove_columns=ds.column_names, desc="packing", keep_in_memory=mem)
        if eval_ds is not None:
            eval_ds = eval_ds.map(pack, batched=True, batch_size=1000, remove_columns=eval_ds.column_names,
                                  desc="packing", keep_in_memory=mem)
    return ds, eval_ds


PACKING_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def packing_problem(model) -> str | None:
    """Why packed rows would leak attention between examples in ``model``, or None if they will not.

    transformers separates packed examples by their position_ids only for the attention
    implementations above, and only when the forward pass runs without a KV cache.
    """
    config = getattr(model, "config", None)
    attn = getattr(config, "_attn_implementation", None)
    if attn not in PACKING_ATTENTION:
        return f"packing needs attention that honours position_ids ({', '.join(PACKING_ATTENTION)}); the model uses {attn!r}"
    if getattr(config, "use_cache", False):
        return "packing needs model.config.use_cache = False (a training forward with a KV cache ignores packed position_ids); efft.model.load_model sets it"
    return None


@dataclass
class Collator:
    """Pads a list of examples on the right: input_ids with the pad token, labels with -100.

    Unpacked rows get an ``attention_mask``. Packed rows (with ``position_ids``) get none, because an
    explicit 2-D mask makes transformers skip the position_ids-based separation of examples; their
    padding gets positions restarting at 0, so it forms a separate (unlabelled) sequence.
    """

    pad_token_id: int
    packed: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict:
        has_pos = "position_ids" in features[0]
        if self.packed and not has_pos:
            raise ValueError("collator: packing is on but the rows have no position_ids; build the dataset with data.packing: true")
        n = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            n = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(features), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long)
        out = {"input_ids": ids, "labels": labels}
        if has_pos:
            pos = torch.arange(n).repeat(len(features), 1)
            out["position_ids"] = pos
        else:
            out["attention_mask"] = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.as_tensor(f["input_ids"])
            labels[i, :k] = torch.as_tensor(f["labels"])
            if has_pos:
                pos[i, :k] = torch.as_tensor(f["position_ids"])
                pos[i, k:] = torch.arange(n - k)
            else:
                out["attention_mask"][i, :k] = 1
        return out


def make_collator(tokenizer, cfg) -> Collator:
    """The collator for ``cfg`` (a DataConfig-like object): padding, packed rows if ``cfg.packing``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("collator: the tokenizer has neither a pad token nor an eos token to pad with")
    return Collator(pad_token_id=pad, packed=bool(getattr(cfg, "packing", False)))
