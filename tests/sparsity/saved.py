"""Bytes autograd saves for backward inside one decoder layer's forward."""
from contextlib import contextmanager

import torch


@contextmanager
def layer_saved(model, layer):
    """Yields {storage: bytes} of what autograd saves while ``layer`` runs forward (a saved_tensors_hooks
    context opened and closed by the layer's own hooks, each storage once, ``model``'s parameters
    excluded); run the forward (and backward) inside the ``with``."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    hooks = [layer.register_forward_pre_hook(lambda *a: ctx.__enter__()),
             layer.register_forward_hook(lambda *a: ctx.__exit__(None, None, None))]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()
