"""A tiny transformers.Trainer run with a layer-wise optimizer (accumulation, clipping inside the
optimizer, warmup + linear schedule) gives the same weights as a plain loop."""
import pytest
import torch
from torch.utils.data import IterableDataset
from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

from .helpers import model
from .test_layerwise import build, micro_batches

STEPS, ACCUM, CLIP = 4, 2, 0.3


class Stream(IterableDataset):
    """Examples in a fixed order (no sampler shuffling), the same ones the plain loop sees."""

    def __iter__(self):
        for s in range(STEPS):
            for mb in micro_batches(s, n=ACCUM):
                for i in range(mb["input_ids"].shape[0]):
                    yield {k: v[i] for k, v in mb.items()}


@pytest.mark.parametrize("name", ["galore", "apollo_mini"])
def test_trainer_matches_plain_loop(tmp_path, name):
    ref = model()
    opt = build(ref, name, True, accum=ACCUM, clip=CLIP)
    sched = get_linear_schedule_with_warmup(opt, 2, STEPS)
    for s in range(STEPS):
        for mb in micro_batches(s, n=ACCUM):
            (ref(**mb).loss / ACCUM).backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    m = model()
    topt = build(m, name, True, accum=ACCUM, clip=CLIP)
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=STEPS, per_device_train_batch_size=2,
        gradient_accumulation_steps=ACCUM, learning_rate=2e-3, lr_scheduler_type="linear", warmup_steps=2,
        max_grad_norm=CLIP, logging_steps=1, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=m, args=args, train_dataset=Stream(), optimizers=(topt, None), callbacks=topt.trainer_callbacks())
    trainer.train()
    assert trainer.lr_scheduler.last_epoch == STEPS  # once per optimizer step
    for a, b in zip(ref.parameters(), m.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    logged = [h["grad_norm"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == STEPS and all(g > 0 for g in logged)


def test_trainer_refuses_mismatched_accumulation(tmp_path):
    m = model()
    opt = build(m, "galore", True, accum=1)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_grad_norm=0.0, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=m, args=args, train_dataset=Stream(), optimizers=(opt, None), callbacks=opt.trainer_callbacks())
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        trainer.train()
