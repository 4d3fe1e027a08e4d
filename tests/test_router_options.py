"""Router options of the recipe study: a router bias that starts scores away from the threshold
(``router_init``) and the global form of the capacity regulariser (``reg_form``)."""

import math

import pytest
import torch

from rt_lib.mindskip.config import MindSkipConfig
from rt_lib.mindskip.model import MindSkipModel, get_mindskip_model
from tests.tiny_models import padded_batch, random_routers, tiny_model


def test_router_init_starts_every_router_at_that_score_and_keeps_everything():
    model = tiny_model("llama")
    ids, mask = padded_batch([7, 4])
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=3, router_init=0.8))
    assert all(r.bias is not None and float(torch.sigmoid(r.bias.detach())) == pytest.approx(0.8) for r in ms.routers().values())
    assert len(ms.router_parameters()) == 6  # weight and bias of 3 routers
    with torch.no_grad():
        out = ms(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out, plain, atol=0, rtol=0)
    assert ms.skip_ratio() == 0.0
    ms.unload()


def test_zero_init_routers_have_no_bias():
    ms = get_mindskip_model(tiny_model("llama"), MindSkipConfig(num_routed_layers=3))
    assert all(r.bias is None for r in ms.routers().values())
    assert sorted(ms.router_state_dict()) == [f"layers.{i}.router.weight" for i in (2, 3, 4)]


def test_router_bias_saved_and_loaded(tmp_path):
    model = tiny_model("llama")
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=3, router_init=0.3))
    random_routers(ms, seed=3)
    with torch.no_grad():
        for r in ms.routers().values():
            r.bias.add_(torch.randn(1))
    saved = {k: v.clone() for k, v in ms.router_state_dict().items()}
    ms.save_pretrained(tmp_path / "r")
    ms.unload()
    ms2 = MindSkipModel.from_pretrained(model, tmp_path / "r")
    assert {k: v for k, v in ms2.router_state_dict().items()}.keys() == saved.keys()
    assert all(torch.equal(ms2.router_state_dict()[k], v) for k, v in saved.items())


@pytest.mark.parametrize("bad", [0.0, 1.0, float("nan"), "0.9"])
def test_router_init_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="router_init"):
        MindSkipConfig(router_init=bad)


def test_regulariser_forms():
    """layer: lambda * sum_l ReLU(c_l - s); global: lambda * n * ReLU(mean_l c_l - s)."""
    caps = {1: 0.9, 2: 0.1, 3: 0.5}
    for form, expected in (("layer", 0.2 * (0.4 + 0.0 + 0.0)), ("global", 0.2 * 3 * max(0.0, 0.5 - 0.5))):
        ms = get_mindskip_model(tiny_model("llama"), MindSkipConfig(routed_layers=[1, 2, 3], reg_lambda=0.2,
                                                                    capacity_target=0.5, reg_form=form))
        for i, g in ms.gates.items():
            g.capacity = torch.tensor(caps[i])
        assert float(ms.regularizer()) == pytest.approx(expected)
        ms.unload()
    ms = get_mindskip_model(tiny_model("llama"), MindSkipConfig(routed_layers=[1, 2, 3], reg_lambda=0.2,
                                                                capacity_target=0.3, reg_form="global"))
    for i, g in ms.gates.items():
        g.capacity = torch.tensor(caps[i])
    assert float(ms.regularizer()) == pytest.approx(0.2 * 3 * (0.5 - 0.3))  # budget shared: 0.1 pays for 0.9
    with pytest.raises(ValueError, match="reg_form"):
        MindSkipConfig(reg_form="sum")
    assert math.isfinite(float(ms.regularizer()))
