"""Shared plumbing: the EMA update against its closed form."""
import numpy as np
import torch

from common import ema_update


def test_ema_update_closed_form():
    """ema <- d * ema + (1 - d) * model on parameters; buffers are copied from the model."""
    torch.manual_seed(0)
    model, ema = torch.nn.BatchNorm1d(5), torch.nn.BatchNorm1d(5)
    for m in (model, ema):
        with torch.no_grad():
            m.weight.normal_(), m.bias.normal_(), m.running_mean.normal_()
    before = {k: v.double().numpy().copy() for k, v in ema.state_dict().items()}
    target = {k: v.double().numpy().copy() for k, v in model.state_dict().items()}
    ema_update(ema, model, 0.75)
    for k in ("weight", "bias"):
        np.testing.assert_allclose(ema.state_dict()[k].double().numpy(), 0.75 * before[k] + 0.25 * target[k],
                                   rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(ema.running_mean.numpy(), model.running_mean.numpy())
    # the model is unchanged
    np.testing.assert_array_equal(model.weight.detach().double().numpy(), target["weight"])
