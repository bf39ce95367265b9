"""InstanceForward chains: a wrapper taken out from the top, the middle or the bottom leaves the
others calling what they wrapped; the class's forward is looked up at call time."""
import torch
from torch import nn

from efft.sparsity.instance_forward import InstanceForward, remove_wrapper


class Add(InstanceForward):
    def __init__(self, module, k):
        super().__init__(module)
        self.k = k

    def forward(self, x):
        return self.inner(x) + self.k


class Other(Add):
    pass


def _chain():
    lin = nn.Linear(3, 3, bias=False).requires_grad_(False)
    nn.init.eye_(lin.weight)
    a, b, c = Add(lin, 1).install(), Other(lin, 10).install(), Add(lin, 100).install()
    return lin, a, b, c


def test_take_out_any_link():
    x = torch.zeros(1, 3)
    for drop, left in ((2, 11), (1, 101), (0, 110)):
        lin, *ws = _chain()
        assert float(lin(x)[0, 0]) == 111
        ws[drop].restore()
        assert not ws[drop].installed() and all(w.installed() for i, w in enumerate(ws) if i != drop)
        assert float(lin(x)[0, 0]) == left
    lin, a, b, c = _chain()
    assert remove_wrapper(lin, Other) and float(lin(x)[0, 0]) == 101
    assert not remove_wrapper(lin, Other)
    a.restore(), c.restore()
    assert "forward" not in lin.__dict__ and float(lin(x)[0, 0]) == 0
