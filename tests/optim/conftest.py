"""One intra-op thread: the tiny shapes here gain nothing from more, and on a shared 2-core
machine extra threads only fight the other test processes."""
import torch

torch.set_num_threads(1)
