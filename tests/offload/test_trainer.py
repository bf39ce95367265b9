"""Offload under transformers.Trainer (no training-loop change): accumulation, clipping, the LR
scheduler and checkpoint resume give bitwise the same weights as Trainer with plain AdamW."""
import warnings

import torch
from transformers import Trainer, TrainingArguments

from efft.offload.activations import enable_activation_offload
from efft.offload.optimizer import OffloadOptimizer
from tests.offload.helpers import cfg, model, same_params
from tests.tiny import tiny_batch


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=16):
        b = tiny_batch(batch=n, seq=seq, seed=7)
        self.rows = [{k: v[i] for k, v in b.items()} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def args(out, max_steps, **kw):
    base = dict(output_dir=str(out), use_cpu=True, report_to=[], max_steps=max_steps, per_device_train_batch_size=2,
                gradient_accumulation_steps=2, max_grad_norm=0.5, learning_rate=1e-2, lr_scheduler_type="linear",
                warmup_steps=1, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def offload_trainer(m, a):
    opt = OffloadOptimizer([p for p in m.parameters() if p.requires_grad], torch.optim.AdamW, cfg(), lr=a.learning_rate,
                           trace=True)
    return Trainer(model=m, args=a, train_dataset=Rows(), optimizers=(opt, None), callbacks=opt.trainer_callbacks()), opt


def test_trainer_offload_equals_plain_and_resumes(tmp_path):
    warnings.simplefilter("ignore")
    ref = model()
    a = args(tmp_path / "ref", 4)
    plain = torch.optim.AdamW(ref.parameters(), lr=a.learning_rate)
    Trainer(model=ref, args=a, train_dataset=Rows(), optimizers=(plain, None)).train()

    m = model()
    enable_activation_offload(m, cfg())
    a = args(tmp_path / "off", 4, save_strategy="steps", save_steps=2)
    tr, opt = offload_trainer(m, a)
    tr.train()
    assert same_params(ref, m)
    assert a.max_grad_norm == 0.5  # Trainer's setting restored after the run
    assert opt.gradient_accumulation_steps == 2 and opt.last_grad_norm is not None
    assert any(e[0] == "launch" and e[2] == "backward" for e in opt.trace)  # CPU steps ran during backward
    assert any(e[0] == "step" and e[1] is not None for e in opt.trace)

    # Resume from the step-2 checkpoint (optimizer state saved from host memory) into a fresh model.
    m2 = model(seed=9)
    enable_activation_offload(m2, cfg())
    a2 = args(tmp_path / "off", 4, save_strategy="steps", save_steps=2)
    tr2, opt2 = offload_trainer(m2, a2)
    tr2.train(resume_from_checkpoint=str(tmp_path / "off" / "checkpoint-2"))
    assert same_params(ref, m2)
    opt.close()
    opt2.close()
