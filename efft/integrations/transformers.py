"""efft inside existing transformers code: a plugin and a callback, no Trainer subclass.

    plugin = EfftPlugin("recipes/smollm2-apollo-mini.yaml")
    model = plugin.prepare_model(model)
    trainer = Trainer(model=model, args=args, train_dataset=ds, **plugin.trainer_kwargs(model, args))
    trainer.train(resume_from_checkpoint=plugin.last_checkpoint(args.output_dir))

``efft train`` runs exactly this code, so the CLI and the plugin give the same numbers.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

COMPLETE_MARKER = "efft_complete.json"


class EfftCallback(TrainerCallback):
    """Logs tokens/s and memory with the run's metrics, marks finished checkpoints, keeps the history
    the run card needs."""

    def __init__(self, tracker=None):
        from efft.memory.tracker import MemoryTracker

        self.tracker = tracker or MemoryTracker()
        self.t0: float | None = None
        self.start_step = 0
        self.tokens0 = 0
        self.train_seconds = 0.0
        self.tokens_per_second: float | None = None
        self.optimizer = None
        self.model = None
        self._measuring = "done"

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.model, self.optimizer = model, optimizer
        self.tracker.start()
        # The first optimizer step is measured in detail (peak gradient bytes, saved-activation
        # bytes); the hooks come off afterwards so the other steps run at full speed.
        self.tracker.watch_gradients(model)
        self._measuring = "pending"
        self.start_step = state.global_step  # > 0 when resumed
        self.t0 = time.perf_counter()
        self.tokens0 = state.num_input_tokens_seen

    def on_step_begin(self, args, state, control, model=None, **kw):
        if self._measuring == "pending":
            self.tracker.begin_saved_tensors(model)
            self._measuring = "on"

    def on_step_end(self, args, state, control, **kw):
        if self._measuring == "on":
            self.stop_measuring()

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is None or self.t0 is None or "loss" not in logs:
            return
        elapsed = time.perf_counter() - self.t0
        tokens = state.num_input_tokens_seen - self.tokens0
        if elapsed > 0 and tokens > 0:
            self.tokens_per_second = tokens / elapsed
            logs.setdefault("train_tokens_per_second", round(self.tokens_per_second, 1))
        peak = self.tracker.peak_bytes()
        if peak:
            logs["peak_mem_gb"] = round(peak / 2**30, 3)

    def on_save(self, args, state, control, **kw):
        # Trainer writes checkpoint-N in place; the marker (written by rename) says it is whole, and
        # last_checkpoint() resumes only from checkpoints that have one. Every rank writes into it (its RNG
        # state; under FSDP its optimizer shards, written by the callback before this one): wait for all.
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        if not args.should_save:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            write_json_atomic(ckpt / COMPLETE_MARKER, {"global_step": state.global_step, "time": time.time()})

    def on_train_end(self, args, state, control, **kw):
        if self.t0 is not None:
            self.train_seconds = time.perf_counter() - self.t0
        self.stop_measuring()

    def stop_measuring(self) -> None:
        """Take the first-step measuring hooks off (also when no step ran, or the step failed)."""
        if self._measuring == "on":
            self.tracker.end_saved_tensors()
        self.tracker.unwatch_gradients()
        self._measuring = "done"

    def memory_report(self) -> dict:
        return self.tracker.report(self.model, self.optimizer)


class LabelRowsCallback(TrainerCallback):
    """Makes Trainer's training batches carry their label rows, so loss-token skipping gathers them
    without reading their count back from the device.

    Trainer builds its data loader from whatever collator the user gave; at train begin this wraps
    that loader's collate_fn in :class:`efft.sparsity.LabelRowsCollator` (each process, each DDP rank,
    collates and indexes its own batches). A loader that collates on one process and slices the
    batch for the others (accelerate's ``dispatch_batches``) is left alone: the forward then finds
    the rows itself, with one read.
    """

    def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
        from efft.sparsity.label_rows import LabelRowsCollator

        if train_dataloader is None or _dispatches_batches(train_dataloader):
            return
        loader = getattr(train_dataloader, "base_dataloader", train_dataloader)  # accelerate's adapter iterates this one
        fn = getattr(loader, "collate_fn", None)
        if fn is not None and not isinstance(fn, LabelRowsCollator):
            loader.collate_fn = LabelRowsCollator(fn)


def _dispatches_batches(loader) -> bool:
    try:
        from accelerate.data_loader import DataLoaderDispatcher
    except ImportError:  # pragma: no cover - accelerate comes with transformers' Trainer
        return False
    return isinstance(loader, DataLoaderDispatcher)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint-N under ``output_dir`` that was written completely, or None."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    done = []
    for d in out.iterdir():
        if d.is_dir() and d.name.startswith("checkpoint-") and d.name[11:].isdigit() and (d / COMPLETE_MARKER).is_file():
            done.append((int(d.name[11:]), d))
    return str(max(done)[1]) if done else None


class EfftPlugin:
    """A recipe (path, dict or Recipe) turned into what transformers code needs.

    Only the sections that change the model or the optimizer are used (quant, adapter, sparsity,
    offload, optim); ``model``/``data`` may be left out when the caller brings its own.
    """

    def __init__(self, recipe, overrides: list[str] | None = None):
        from efft import config

        if isinstance(recipe, config.Recipe):
            self.recipe = recipe
            if overrides:
                self.recipe = config.validate(config.apply_overrides(config.recipe_to_dict(recipe), overrides), source="(recipe)")
        elif isinstance(recipe, dict):
            # model/data may be left out (the caller has them): inert stand-ins, not checked on disk
            files = "data" in recipe and "model" in recipe
            data = config.apply_overrides(_with_placeholders(recipe), overrides or [])
            self.recipe = config.validate(data, source="(dict)", files=files)
        else:
            self.recipe = config.load_recipe(recipe, overrides)
        from efft.compose import check_recipe

        check_recipe(self.recipe)
        self.callback: EfftCallback | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.resume_from: str | None = None  # the checkpoint handed to trainer.train (see last_checkpoint)

    def prepare_model(self, model):
        from efft.compose import prepare_model

        return prepare_model(model, self.recipe)

    def create_optimizer(self, model, args: TrainingArguments | None = None) -> torch.optim.Optimizer:
        """The recipe's optimizer; lr, weight decay, betas, eps, clipping and accumulation are read
        from ``args`` when given (else from the recipe's ``train`` section). An optimizer this plugin
        built before is closed first, so its backward hooks cannot keep training the model."""
        from efft.compose import build_optimizer, close_optimizer

        close_optimizer(self.optimizer)
        self.optimizer = build_optimizer(model, self.recipe, args)
        return self.optimizer

    def training_arguments(self, **overrides) -> TrainingArguments:
        """TrainingArguments from the recipe's ``train`` section (keyword overrides win)."""
        return training_arguments(self.recipe, **overrides)

    def trainer_kwargs(self, model, args: TrainingArguments) -> dict:
        """``optimizers`` and ``callbacks`` for ``Trainer(...)``; the scheduler is left to Trainer.
        With ``sparsity.loss_tokens`` on, the callbacks include :class:`LabelRowsCallback`.

        ``args`` are the ``TrainingArguments`` you give Trainer: the optimizer takes its
        hyper-parameters from them, and settings that contradict the recipe are refused here, all
        at once."""
        if not isinstance(args, TrainingArguments):
            raise TypeError("trainer_kwargs(model, args): pass the TrainingArguments you give Trainer "
                            f"(the optimizer's lr, betas, clipping come from them), got {type(args).__name__}")
        check_training_arguments(self.recipe, args)
        if self.recipe.train.fsdp:
            self._shard(model, args)
        tracker = None
        off = self.recipe.offload
        host_embeddings = self.recipe.quant.trainable and self.recipe.quant.embeddings == "host"
        if off.optimizer or off.activations or off.weights or host_embeddings:
            from efft.memory.tracker import MemoryTracker
            from efft.offload import host_bytes_in_use

            tracker = MemoryTracker(host_bytes=host_bytes_in_use)  # the report shows host memory used
        self.callback = EfftCallback(tracker)
        optimizer = self.create_optimizer(model, args)
        # Optimizers that update inside backward (layer-wise, offloaded) bring the callbacks that tie
        # them to Trainer's accumulation and clipping.
        extra = list(getattr(optimizer, "trainer_callbacks", lambda: [])())
        if self.recipe.sparsity.loss_tokens.enabled:
            extra.append(LabelRowsCallback())
        first = []
        if self.recipe.train.fsdp:  # its checkpoint files are written before EfftCallback marks the checkpoint whole
            from efft.integrations.fsdp import fsdp_checkpoints

            first.append(fsdp_checkpoints(lambda: self.resume_from))
        return {"optimizers": (optimizer, None), "callbacks": [*first, self.callback, *extra]}

    def _shard(self, model, args: TrainingArguments) -> None:
        """FSDP2 over the launch's ranks, before the optimizer is built on the sharded parameters."""
        from efft.config import RecipeError
        from efft.integrations.fsdp import ALONE, is_sharded, shard_model

        if args.world_size < 2:  # reading it also starts the process group under torchrun
            raise RecipeError([("train.fsdp", ALONE)])
        if not is_sharded(model):
            shard_model(model, reshard_after_forward=self.recipe.train.fsdp_config.reshard_after_forward)

    def last_checkpoint(self, output_dir) -> str | None:
        """The newest complete checkpoint under ``output_dir`` (None: none), to pass to ``trainer.train``.
        Remembered: under FSDP the plugin's callback loads the optimizer state from the same one."""
        self.resume_from = last_checkpoint(output_dir)
        return self.resume_from


def check_training_arguments(recipe, args: TrainingArguments) -> None:
    """Refuse TrainingArguments that contradict the recipe (raises RecipeError listing each)."""
    from efft.config import RecipeError

    problems = []
    default_optim = TrainingArguments.__dataclass_fields__["optim"].default
    if str(getattr(args.optim, "value", args.optim)) != str(getattr(default_optim, "value", default_optim)):
        problems.append(("optim", f"TrainingArguments.optim={args.optim!r} would be ignored: the optimizer comes from the "
                                  f"recipe's optim section ({recipe.optim.name}); leave TrainingArguments.optim at its default"))
    q = recipe.quant
    if q.type != "none" and args.fp16 and q.compute_dtype == "bfloat16":
        problems.append(("quant.compute_dtype", "bfloat16 compute with TrainingArguments.fp16=True: use bf16=True or compute_dtype float16"))
    if (recipe.optim.layerwise or recipe.offload.optimizer) and args.deepspeed:
        problems.append(("optim.layerwise" if recipe.optim.layerwise else "offload.optimizer",
                         "updates inside backward cannot run under DeepSpeed; use DDP (torchrun) or turn it off"))
    if q.type != "none" and args.deepspeed:
        problems.append(("quant.type", f"{q.type} weights are packed integer buffers that DeepSpeed cannot shard; "
                                       "use DDP (torchrun), where each rank holds the quantized model, or train.fsdp"))
    if args.fsdp:
        from efft.integrations.fsdp import fsdp_problems

        problems.append(("TrainingArguments.fsdp", "efft shards the model itself: set train.fsdp: true in the recipe and leave "
                                                   "TrainingArguments.fsdp unset (accelerate runs its FSDP only on accelerators, "
                                                   "silently DDP on CPU, and Trainer refuses a given optimizer under it)"))
        if not recipe.train.fsdp:
            problems += fsdp_problems(recipe)
    if recipe.train.fsdp and str(getattr(args.save_strategy, "value", args.save_strategy)) != "no" and not args.save_only_model:
        problems.append(("TrainingArguments.save_only_model", "train.fsdp: transformers refuses to write optimizer state "
                                                              "for a model sharded outside it (efft writes it, sharded, "
                                                              "beside the model); set save_only_model=True "
                                                              "(or save_strategy='no')"))
    if recipe.train.fsdp and args.deepspeed:
        problems.append(("train.fsdp", "FSDP and TrainingArguments.deepspeed both shard the model: choose one"))
    explicit = recipe.train.model_fields_set
    for name in sorted(explicit):
        if hasattr(args, name) and name not in ("output_dir", "report_to", "resume_from_checkpoint", "use_cpu",
                                                "fsdp", "fsdp_config"):  # efft shards itself (efft.integrations.fsdp)
            mine, theirs = getattr(recipe.train, name), getattr(args, name)
            if name == "gradient_checkpointing":  # transformers >= 5.x: activation_checkpointing, the old name mirrors it
                theirs = bool(getattr(args, "activation_checkpointing", theirs))
            theirs = getattr(theirs, "value", theirs)  # enums such as SchedulerType
            if mine != theirs:
                problems.append((f"train.{name}", f"recipe says {mine!r}, TrainingArguments says {theirs!r}: set one"))
    if problems:
        raise RecipeError(problems, source="EfftPlugin + TrainingArguments")


def _with_placeholders(d: dict) -> dict:
    """Plugin dicts may omit model/data (the caller has them); fill inert values for validation."""
    d = dict(d)
    d.setdefault("model", {"config": {"model_type": "llama"}})
    d.setdefault("data", {"path": str(Path(__file__).resolve().parents[2] / "data" / "quickstart.jsonl")})
    return d


def training_arguments(recipe, **overrides) -> TrainingArguments:
    t = recipe.train
    cpu = t.use_cpu or not torch.cuda.is_available()
    kw = dict(
        output_dir=t.output_dir,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        max_grad_norm=t.max_grad_norm,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        seed=t.seed,
        data_seed=t.data_seed,
        bf16=t.bf16,
        fp16=t.fp16,
        **_checkpointing_args(t.gradient_checkpointing),
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        dataloader_num_workers=t.dataloader_num_workers,
        use_cpu=cpu,
        report_to=t.report_to or "none",
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        disable_tqdm=False,
        # efft's FSDP: transformers writes the model only (it refuses optimizer state for a model sharded outside
        # it); efft.integrations.fsdp.fsdp_checkpoints writes the rest
        save_only_model=t.fsdp,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def _checkpointing_args(enabled: bool) -> dict:
    """transformers >= 5.x renamed gradient_checkpointing to activation_checkpointing; older keeps the old name."""
    import dataclasses

    name = "activation_checkpointing" if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)} else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}
