"""apply_sparsity: recipe sections in, methods composed, errors before anything is installed."""
import copy
from types import SimpleNamespace

import pytest
import torch

from efft.config import SparsityConfig
from efft.sparsity import apply_sparsity, partial_modules, sampled_modules, sparsity_problems
from tests.tiny import tiny_batch, tiny_model


def _cfg(**sections):
    return SparsityConfig(**{k: dict(enabled=True, **v) for k, v in sections.items()})


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_all_methods_compose_on_full_finetuning():
    model = tiny_model("llama", layers=3)
    cfg = _cfg(loss_tokens=dict(chunk_size=8), token_elimination=dict(keep_ratio=0.5, start_layer=1),
               sampled_linear=dict(keep=0.3))
    assert apply_sparsity(model, cfg) is model
    assert hasattr(model, "_efft_loss_tokens") and hasattr(model, "_efft_token_elimination") and sampled_modules(model)
    batch = tiny_batch(seq=32, label_fraction=0.3)
    model.train()
    out = model(**batch)
    assert out.logits is None and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(g).all() for g in _grads(model).values())
    assert set(model._efft_token_elimination.last_kept) == {1, 2}


def test_loss_tokens_and_elimination_at_keep_one_are_exact_with_checkpointing():
    dense = tiny_model("qwen2")
    model = apply_sparsity(copy.deepcopy(dense), _cfg(loss_tokens={}, token_elimination=dict(keep_ratio=1.0, start_layer=0)))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = tiny_batch(seq=16, label_fraction=0.5)
    dense.train()
    model.train()
    ref, out = dense(**batch), model(**batch)
    torch.testing.assert_close(out.loss, ref.loss)
    ref.loss.backward()
    out.loss.backward()
    g = _grads(model)
    for n, p in _grads(dense).items():
        torch.testing.assert_close(g[n], p, rtol=1e-4, atol=1e-6)


def test_elimination_with_checkpointing_matches_without():
    cfg = _cfg(loss_tokens={}, token_elimination=dict(keep_ratio=0.4, start_layer=0))
    a = apply_sparsity(tiny_model("llama"), cfg)
    b = apply_sparsity(tiny_model("llama"), cfg)
    b.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = tiny_batch(seq=24, label_fraction=0.3, seed=2)
    for m in (a, b):
        m.train()
        m(**batch).loss.backward()
    ga, gb = _grads(a), _grads(b)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6)


def test_partial_with_loss_tokens_and_elimination():
    model = apply_sparsity(tiny_model("mistral"), _cfg(loss_tokens={}, token_elimination=dict(keep_ratio=0.5),
                                                       partial=dict(fraction=0.1)))
    assert partial_modules(model)
    model.train()
    model(**tiny_batch(seq=24, label_fraction=0.4)).loss.backward()
    assert all(m.paca_weight.grad is not None for m in partial_modules(model).values())


def test_on_peft_lora_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules="all-linear"))
    apply_sparsity(model, _cfg(loss_tokens={}, token_elimination=dict(keep_ratio=0.5), sampled_linear=dict(keep=0.5)))
    assert sampled_modules(model)
    model.train()
    out = model(**tiny_batch(seq=24, label_fraction=0.4))
    assert out.logits is None
    assert model.base_model.model._efft_token_elimination.last_kept  # elimination ran under peft's forward
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_bad_values_reported_together_before_anything_is_installed():
    cfg = SimpleNamespace(
        loss_tokens=SimpleNamespace(enabled=True, chunk_size=0),
        token_elimination=SimpleNamespace(enabled=True, keep_ratio=1.5, start_layer=0, unbiased=False, min_seq_length=0),
        sampled_linear=SimpleNamespace(enabled=True, keep=0.0, deterministic_fraction=2.0, target_modules="all-linear"),
        partial=SimpleNamespace(enabled=False),
    )
    model = tiny_model("llama")
    with pytest.raises(ValueError) as e:
        apply_sparsity(model, cfg)
    msg = str(e.value)
    for key in ("loss_tokens.chunk_size", "token_elimination.keep_ratio", "sampled_linear.keep",
                "sampled_linear.deterministic_fraction"):
        assert key in msg
    assert "forward" not in model.__dict__ and not sampled_modules(model)

    assert sparsity_problems({"loss_tokens": {"enabled": True}, "dropout_tokens": {}})[0][1].startswith("unknown method")
    both = _cfg(sampled_linear={}, partial={})
    with pytest.raises(ValueError, match="cannot be combined"):
        apply_sparsity(tiny_model("llama"), both)


def test_model_dependent_errors_before_install():
    model = tiny_model("llama")  # 2 layers
    with pytest.raises(ValueError, match="one per layer"):
        apply_sparsity(model, _cfg(loss_tokens={}, token_elimination=dict(keep_ratio=[0.5, 0.5, 0.5])))
    assert "forward" not in model.__dict__  # loss-token skipping was not installed either
    with pytest.raises(ValueError, match="start_layer"):
        apply_sparsity(model, _cfg(token_elimination=dict(start_layer=5)))
    with pytest.raises(ValueError, match="causal-LM"):
        apply_sparsity(torch.nn.Linear(3, 3), _cfg(loss_tokens={}))


def test_recipe_path_quantized_base_lora_and_sparsity():
    """The lead's composition (efft.compose.prepare_model): nf4 base -> LoRA -> sparsity -> a step.
    Loss-token skipping stays exact on the quantized model; WTA-CRS lands on the LoRA layers."""
    pytest.importorskip("peft")
    from efft.compose import prepare_model
    from efft.config import Recipe

    def recipe(sparsity):
        return Recipe(model={"config": {"model_type": "llama"}}, data={"path": "unused.jsonl"},
                      quant={"type": "nf4", "compute_dtype": "float32"}, adapter={"type": "lora", "r": 4},
                      sparsity=sparsity)

    torch.manual_seed(0)
    dense = prepare_model(tiny_model("llama"), recipe({}))
    exact = prepare_model(tiny_model("llama"), recipe({"loss_tokens": {"enabled": True}}))
    exact.load_state_dict(dense.state_dict())
    batch = tiny_batch(seq=24, label_fraction=0.4, seed=7)
    dense.train()
    exact.train()
    ref, out = dense(**batch), exact(**batch)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    ref.loss.backward()
    out.loss.backward()
    g = _grads(exact)
    assert g.keys() == _grads(dense).keys() and g
    for n, p in _grads(dense).items():
        torch.testing.assert_close(g[n], p, rtol=1e-4, atol=1e-6)

    full = prepare_model(tiny_model("llama"), recipe({"loss_tokens": {"enabled": True},
                                                      "token_elimination": {"enabled": True, "keep_ratio": 0.5},
                                                      "sampled_linear": {"enabled": True, "keep": 0.3}}))
    names = sampled_modules(full)
    assert names and all(".lora_" in n for n in names)
    full.train()
    full(**batch).loss.backward()
    assert all(p.grad is not None for p in full.parameters() if p.requires_grad)


def test_recipe_path_trainable_int8_with_sampled_linear():
    from efft.compose import prepare_model
    from efft.config import Recipe

    r = Recipe(model={"config": {"model_type": "llama"}}, data={"path": "unused.jsonl"},
               quant={"type": "int8", "trainable": True, "compute_dtype": "float32"},
               sparsity={"loss_tokens": {"enabled": True}, "sampled_linear": {"enabled": True, "keep": 0.3}})
    from efft.compose import build_optimizer, check_recipe

    check_recipe(r)  # the recipe checks allow it
    model = prepare_model(tiny_model("llama"), r)
    names = sampled_modules(model)
    assert len(names) == 2 * 7  # every int8 layer of the decoder; the LM head is skipped by quant and here
    model.train()
    model(**tiny_batch(seq=24, label_fraction=0.4)).loss.backward()
    assert all(m.weight.grad is not None and torch.isfinite(m.weight.grad).all() for m in names.values())
    before = {n: m.weight_codes.clone() for n, m in names.items()}
    opt = build_optimizer(model, r)
    opt.step()  # the int8 update (stochastic rounding into the codes) takes the sampled carrier gradient
    assert any(not torch.equal(before[n], m.weight_codes) for n, m in names.items())


def test_attention_score_with_lora_dropout_and_checkpointing_matches_without():
    """score attention with few sampled queries (a random draw per layer), peft LoRA with dropout on
    q/k/v, loss-token skipping: gradient checkpointing's recompute picks the same queries and tokens
    (the global generator is restored), so every gradient matches the run without it."""
    peft = pytest.importorskip("peft")
    cfg = _cfg(loss_tokens={}, token_elimination=dict(keep_ratio=0.4, start_layer=0, score="attention", score_queries=3))

    def build():
        m = peft.get_peft_model(tiny_model("llama", layers=3),
                                peft.LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj"]))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
        return apply_sparsity(m, cfg)

    a, b = build(), build()
    b.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = tiny_batch(seq=24, label_fraction=0.3, seed=2)
    kept = []
    for m in (a, b):
        m.train()
        torch.manual_seed(7)
        m(**batch).loss.backward()
        kept.append({i: t.clone() for i, t in m.base_model.model._efft_token_elimination.last_kept.items()})
    assert kept[0].keys() == {0, 1, 2} and all(torch.equal(kept[0][i], kept[1][i]) for i in kept[0])
    ga, gb = _grads(a), _grads(b)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("extra", [dict(sampled_linear=dict(keep=0.5)), dict(partial=dict(fraction=0.1))],
                         ids=["sampled_linear", "partial"])
def test_attention_score_with_other_methods(extra):
    model = apply_sparsity(tiny_model("qwen2", layers=3),
                           _cfg(loss_tokens={}, token_elimination=dict(keep_ratio=0.5, score="attention"), **extra))
    model.train()
    model(**tiny_batch(seq=24, label_fraction=0.4)).loss.backward()
    assert set(model._efft_token_elimination.last_kept) == {1, 2}
    assert any(p.grad is not None for p in model.parameters())


def test_attention_score_on_qlora_recipe():
    """Built by efft.compose.prepare_model: NF4 base + LoRA, the score calls the quantized q/k projections."""
    from tests.memory.harness import batch_for, build, recipe, tiny_block

    r, cfg, model = build(recipe(tiny_block("llama", layers=3), 2, 32, "sdpa", False,
                                 quant={"type": "nf4", "compute_dtype": "float32"}, adapter={"type": "lora", "r": 8},
                                 sparsity={"token_elimination": {"enabled": True, "keep_ratio": 0.5, "score": "attention"}}))
    from efft.sparsity.loss_tokens import find_causal_lm

    state = find_causal_lm(model)._efft_token_elimination
    assert state.score == "attention" and "Quant" in type(state.attention_parts[1].k_proj.base_layer).__name__
    batch = batch_for(r, cfg)
    batch["labels"][:, :20] = -100
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and set(state.last_kept) == {1, 2}
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_attention_score_refused_before_anything_is_installed():
    model = tiny_model("gpt2", layers=2)
    with pytest.raises(ValueError, match="score: attention cannot score decoder layer 1: GPT2Block has no input_layernorm"):
        apply_sparsity(model, _cfg(loss_tokens={}, token_elimination=dict(keep_ratio=0.5, score="attention")))
    assert not hasattr(model, "_efft_loss_tokens") and not hasattr(model, "_efft_token_elimination")
    problems = dict(sparsity_problems(SimpleNamespace(token_elimination=SimpleNamespace(
        enabled=True, keep_ratio=0.5, score="attention", unbiased=True, score_queries=0))))
    assert "reads no score" in problems["sparsity.token_elimination.score"]
    assert "integer >= 1" in problems["sparsity.token_elimination.score_queries"]
