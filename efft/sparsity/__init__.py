"""efft.sparsity: token and activation sparsity for fine-tuning.

``apply_sparsity(model, cfg)`` installs what the recipe's ``sparsity:`` section enables, after
quantization and adapters (load -> quantize -> adapter -> sparsity -> optimizer):

- ``loss_tokens``: LM head + cross entropy on label rows only, chunked (exact); ``LabelRowsCollator``
  makes batches carry their label rows so no forward reads them back from the device.
- ``token_elimination``: LeMo-style per-layer token elimination (approximate).
- ``sampled_linear``: WTA-CRS weight gradients from sampled input rows (unbiased).
- ``partial``: PaCA, trained input columns in place of an adapter (exact for what it trains);
  ``save_partial`` / ``load_partial`` / ``merge_partial`` handle its small adapter file.
- ``recompute``: norms keep only their input and gated MLPs only gate and up; the rest is
  recomputed in backward (exact).

Every value is checked before anything is installed; a bad value or a model the generic code
cannot handle raises ValueError naming the recipe key.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .label_rows import LABEL_ROWS_KEY, LabelRows, LabelRowsCollator
from .loss_tokens import apply_loss_tokens, head_cross_entropy, remove_loss_tokens
from .partial import apply_partial, load_partial, merge_partial, partial_modules, save_partial
from .recompute import apply_recompute, remove_recompute
from .sampled_linear import apply_sampled_linear, sampled_modules
from .token_elimination import apply_token_elimination

__all__ = [
    "apply_sparsity", "sparsity_problems", "apply_loss_tokens", "remove_loss_tokens", "head_cross_entropy",
    "LabelRows", "LabelRowsCollator", "LABEL_ROWS_KEY",
    "apply_token_elimination", "apply_sampled_linear", "sampled_modules", "apply_partial", "save_partial",
    "load_partial", "merge_partial", "partial_modules", "apply_recompute", "remove_recompute",
]

SECTIONS = ("loss_tokens", "token_elimination", "sampled_linear", "partial", "recompute")


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _ratio_ok(v, low_open=True) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (0 < v <= 1 if low_open else 0 <= v <= 1)


def _targets_ok(t) -> bool:
    return t == "all-linear" or (isinstance(t, (list, tuple)) and len(t) > 0 and all(isinstance(x, str) and x for x in t))


def sparsity_problems(cfg: Any) -> list[tuple[str, str]]:
    """Every problem in a ``sparsity`` section (duck-typed: pydantic model, object or dict)."""
    p: list[tuple[str, str]] = []
    if isinstance(cfg, dict):
        unknown = set(cfg) - set(SECTIONS)
        if unknown:
            p.append(("sparsity", f"unknown method(s) {sorted(unknown)}; known: {', '.join(SECTIONS)}"))
    lt, te, sl, pa, rc = (_get(cfg, s) for s in SECTIONS)
    if _get(lt, "enabled", False):
        c = _get(lt, "chunk_size", 1024)
        if not (isinstance(c, int) and not isinstance(c, bool) and c > 0):
            p.append(("sparsity.loss_tokens.chunk_size", f"must be a positive integer, got {c!r}"))
    if _get(te, "enabled", False):
        kr = _get(te, "keep_ratio", 0.5)
        vals = kr if isinstance(kr, (list, tuple)) else [kr]
        bad = [v for v in vals if not _ratio_ok(v)]
        if bad or not vals:
            p.append(("sparsity.token_elimination.keep_ratio", f"must be in (0, 1] (one value or one per layer), got {kr!r}"))
        s = _get(te, "start_layer", 1)
        if not (isinstance(s, int) and not isinstance(s, bool) and s >= 0):
            p.append(("sparsity.token_elimination.start_layer", f"must be an integer >= 0, got {s!r}"))
        m = _get(te, "min_seq_length", 0)
        if not (isinstance(m, int) and not isinstance(m, bool) and m >= 0):
            p.append(("sparsity.token_elimination.min_seq_length", f"must be an integer >= 0, got {m!r}"))
        from .token_elimination import score_problems

        p += score_problems(_get(te, "score", "mean_distance"), _get(te, "score_queries", 128), _get(te, "unbiased", False))
    if _get(sl, "enabled", False):
        if not _ratio_ok(_get(sl, "keep", 0.3)):
            p.append(("sparsity.sampled_linear.keep", f"must be in (0, 1], got {_get(sl, 'keep')!r}"))
        if not _ratio_ok(_get(sl, "deterministic_fraction", 0.5), low_open=False):
            p.append(("sparsity.sampled_linear.deterministic_fraction", f"must be in [0, 1], got {_get(sl, 'deterministic_fraction')!r}"))
        if not _targets_ok(_get(sl, "target_modules", "all-linear")):
            p.append(("sparsity.sampled_linear.target_modules", "must be 'all-linear' or a non-empty list of names"))
    if _get(pa, "enabled", False):
        fr, r = _get(pa, "fraction"), _get(pa, "r")
        if fr is not None and not _ratio_ok(fr):
            p.append(("sparsity.partial.fraction", f"must be in (0, 1], got {fr!r}"))
        if r is not None and not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
            p.append(("sparsity.partial.r", f"must be an integer >= 1 (input columns per weight), got {r!r}"))
        if fr is not None and r is not None:
            p.append(("sparsity.partial", "give fraction or r (input columns per weight), not both"))
        if not _targets_ok(_get(pa, "target_modules", "all-linear")):
            p.append(("sparsity.partial.target_modules", "must be 'all-linear' or a non-empty list of names"))
        if _get(sl, "enabled", False):
            p.append(("sparsity.sampled_linear.enabled", "cannot be combined with sparsity.partial: PaCA already keeps only "
                      "its trained columns of each input, and its base weights do not train (choose one)"))
    if _get(rc, "enabled", False):
        flags = {k: _get(rc, k, True) for k in ("norms", "gated_mlp")}
        for k, v in flags.items():
            if not isinstance(v, bool):
                p.append((f"sparsity.recompute.{k}", f"must be true or false, got {v!r}"))
        if flags["norms"] is False and flags["gated_mlp"] is False:
            p.append(("sparsity.recompute", "enabled with norms and gated_mlp both false: nothing to recompute "
                      "(set one of them to true, or enabled: false)"))
    return p


def apply_sparsity(model: nn.Module, cfg: Any) -> nn.Module:
    """Install the enabled sparsity methods on ``model`` (a transformers causal LM, possibly
    quantized and/or peft-wrapped) and return it (the same object).

    Order: recompute (innermost: the module classes of norms and MLPs; the wrappers installed
    after it call them), PaCA, WTA-CRS (the linears' own forwards), loss-token skipping (checked
    against the model's own loss on a short input; its last-block wrappers call the linears' forwards
    on label rows), token elimination. Raises ValueError listing every bad value before installing
    anything, or naming the method and the model when the generic code cannot handle it.
    """
    problems = sparsity_problems(cfg)
    if problems:
        lines = "\n".join(f"  - {k}: {m}" for k, m in problems)
        raise ValueError(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in the sparsity section:\n{lines}")
    lt, te, sl, pa, rc = (_get(cfg, s) for s in SECTIONS)
    if _get(te, "enabled", False):
        _check_elimination_model(model, te)
    if _get(rc, "enabled", False):
        apply_recompute(model, norms=_get(rc, "norms", True), gated_mlp=_get(rc, "gated_mlp", True))
    if _get(pa, "enabled", False):
        apply_partial(model, fraction=_get(pa, "fraction"), target_modules=_get(pa, "target_modules", "all-linear"),
                      seed=_get(pa, "seed", 0), r=_get(pa, "r"))
    if _get(sl, "enabled", False):
        apply_sampled_linear(model, keep=_get(sl, "keep", 0.3), deterministic_fraction=_get(sl, "deterministic_fraction", 0.5),
                             target_modules=_get(sl, "target_modules", "all-linear"))
    if _get(lt, "enabled", False):
        apply_loss_tokens(model, chunk_size=_get(lt, "chunk_size", 1024))
    if _get(te, "enabled", False):
        apply_token_elimination(model, keep_ratio=_get(te, "keep_ratio", 0.5), start_layer=_get(te, "start_layer", 1),
                                unbiased=bool(_get(te, "unbiased", False)), min_seq_length=_get(te, "min_seq_length", 0),
                                score=_get(te, "score", "mean_distance"), score_queries=_get(te, "score_queries", 128))
    return model


def _check_elimination_model(model: nn.Module, te: Any) -> None:
    """Token elimination's model-dependent checks, run before loss-token skipping installs anything."""
    from .loss_tokens import decoder_layers, find_causal_lm

    lm = find_causal_lm(model)
    layers = decoder_layers(lm)
    if layers is None or len(layers) == 0:
        raise ValueError(f"sparsity.token_elimination: cannot find the decoder layers of {type(lm).__name__}")
    kr = _get(te, "keep_ratio", 0.5)
    if isinstance(kr, (list, tuple)) and len(kr) != len(layers):
        raise ValueError(f"sparsity.token_elimination.keep_ratio has {len(kr)} values; the model has {len(layers)} "
                         "decoder layers (give one value, or one per layer)")
    if _get(te, "start_layer", 1) >= len(layers):
        raise ValueError(f"sparsity.token_elimination.start_layer must be in [0, {len(layers) - 1}], got {_get(te, 'start_layer')!r}")
    impl = getattr(lm.config, "_attn_implementation", None) or "eager"
    if impl not in ("eager", "sdpa"):
        raise ValueError(f"sparsity.token_elimination needs attn_implementation eager or sdpa; the model uses {impl!r}")
    if _get(te, "score", "mean_distance") == "attention":
        from .token_elimination import _per_layer, attention_score_problem

        reason = attention_score_problem(layers, _per_layer(kr, len(layers), _get(te, "start_layer", 1)))
        if reason:
            raise ValueError(reason)
