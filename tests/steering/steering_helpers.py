"""Helpers of the steering tests: set vectors, probe what layer 0 got."""

import torch
import torch.nn.functional as F

from brep_rl.steering.sites import decoder_layers


def set_vectors(steer, scale=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in steer.vectors().values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


class Layer0Probe:
    """Records, for every forward call, which positions got a steering delta at layer 0's site.

    Steering only adds to site outputs, so at layer 0 the site's input is the unsteered one and
    output - linear(input) is exactly what steering added there.
    """

    def __init__(self, model, site="mlp.down_proj"):
        self.deltas = []
        module = decoder_layers(model)[0].get_submodule(site)
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.deltas.append((output - F.linear(inputs[0], module.weight, module.bias)).detach())

    def masks(self):
        return [d.abs().sum(-1) > 0 for d in self.deltas]

    def remove(self):
        self.handle.remove()


def first_eos_trim(tokens, eos):
    tokens = tokens.tolist()
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
