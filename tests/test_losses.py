"""Every loss against values computed by hand, and Poly-DPO's gradient against its closed form."""

import math
from types import SimpleNamespace

import pytest
import torch

from vipo_trl.losses import DenoisingErrors, LossOutput, available_losses, get_loss, register_loss

CFG = SimpleNamespace(
    beta=2.0,
    poly_alpha=0.5,
    mapo_beta=0.1,
    mapo_snr=0.5,
    mapo_margin_scale=1000.0,
    kto_desirable_weight=1.0,
    kto_undesirable_weight=1.0,
)
# Two pairs. Pair 0: the policy lowered the chosen error relative to the reference; pair 1: the other way.
ERRORS = DenoisingErrors(
    policy_chosen=torch.tensor([0.2, 0.5]),
    policy_rejected=torch.tensor([0.6, 0.3]),
    ref_chosen=torch.tensor([0.4, 0.4]),
    ref_rejected=torch.tensor([0.4, 0.4]),
)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def logits_by_hand():
    # -0.5 * beta * ((pc - pr) - (rc - rr)) with beta = 2
    return [-1.0 * ((0.2 - 0.6) - 0.0), -1.0 * ((0.5 - 0.3) - 0.0)]  # [0.4, -0.2]


def test_registry_lists_builtin_losses():
    assert {"diffusion_dpo", "dpo", "poly_dpo", "mapo", "kto", "sft"} <= set(available_losses())
    assert get_loss("mapo").needs_reference is False
    assert get_loss("sft").needs_reference is False
    assert get_loss("poly_dpo").needs_reference is True
    with pytest.raises(ValueError, match="Unknown loss 'nope'.*poly_dpo"):
        get_loss("nope")


def test_diffusion_dpo_by_hand():
    expected = sum(-math.log(sigmoid(z)) for z in logits_by_hand()) / 2
    out = get_loss("diffusion_dpo").fn(ERRORS, CFG)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert get_loss("dpo").fn(ERRORS, CFG).loss.item() == pytest.approx(expected, rel=1e-6)


def test_poly_dpo_by_hand():
    a = CFG.poly_alpha
    expected = sum(-math.log(sigmoid(z)) + a * (1 - sigmoid(z)) for z in logits_by_hand()) / 2
    out = get_loss("poly_dpo").fn(ERRORS, CFG)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    # The factor on Diffusion-DPO's gradient, 1 + alpha p, averaged over the pairs: logits 0.4 and -0.2.
    assert out.metrics["poly_dpo/grad_scale"].item() == pytest.approx(1 + a * (sigmoid(0.4) + sigmoid(-0.2)) / 2)
    assert out.metrics["poly_dpo/grad_scale"].item() == pytest.approx(1.2622, abs=1e-4)


def test_poly_dpo_with_alpha_zero_equals_diffusion_dpo_exactly():
    torch.manual_seed(0)
    errors = DenoisingErrors(*(torch.rand(16) for _ in range(4)))
    cfg = SimpleNamespace(beta=5000.0, poly_alpha=0.0)
    poly = get_loss("poly_dpo").fn(errors, cfg).loss
    dpo = get_loss("diffusion_dpo").fn(errors, cfg).loss
    assert torch.equal(poly, dpo)


@pytest.mark.parametrize("alpha", [-1.0, -0.5, 0.0, 0.5, 8.0])
def test_poly_dpo_gradient_matches_closed_form(alpha):
    torch.manual_seed(1)
    pc = torch.rand(6, dtype=torch.float64, requires_grad=True)
    pr, rc, rr = (torch.rand(6, dtype=torch.float64) for _ in range(3))
    cfg = SimpleNamespace(beta=3.0, poly_alpha=alpha)
    get_loss("poly_dpo").fn(DenoisingErrors(pc, pr, rc, rr), cfg).loss.backward()

    logits = -0.5 * cfg.beta * ((pc.detach() - pr) - (rc - rr))
    p = torch.sigmoid(logits)
    dloss_dlogits = -(1 - p) * (1 + alpha * p)
    dlogits_dpc = -0.5 * cfg.beta
    expected = dloss_dlogits * dlogits_dpc / len(pc)  # mean over the batch
    torch.testing.assert_close(pc.grad, expected)


def test_mapo_by_hand():
    s, scale = CFG.mapo_snr, CFG.mapo_margin_scale

    def score(e):
        return s * e / (math.exp(s * e) - 1)

    pcs, prs = [0.2, 0.5], [0.6, 0.3]
    ratio = [math.log(sigmoid(scale * (score(c) - r_))) for c, r_ in zip(pcs, [score(x) for x in prs])]
    expected = sum(pcs) / 2 - CFG.mapo_beta * sum(ratio) / 2
    errors = DenoisingErrors(ERRORS.policy_chosen, ERRORS.policy_rejected)  # reference-free
    assert get_loss("mapo").fn(errors, CFG).loss.item() == pytest.approx(expected, rel=1e-5)


def test_kto_by_hand():
    beta = CFG.beta
    r_w = [-0.5 * beta * (0.2 - 0.4), -0.5 * beta * (0.5 - 0.4)]  # [0.2, -0.1]
    r_l = [-0.5 * beta * (0.6 - 0.4), -0.5 * beta * (0.3 - 0.4)]  # [-0.2, 0.1]
    z = max(0.0, sum(r_w + r_l) / 4)
    terms = [1 - sigmoid(r - z) for r in r_w] + [1 - sigmoid(z - r) for r in r_l]
    expected = sum(terms) / 4
    assert get_loss("kto").fn(ERRORS, CFG).loss.item() == pytest.approx(expected, rel=1e-6)


def test_kto_reference_point_is_clamped_at_zero_and_weighted():
    cfg = SimpleNamespace(beta=2.0, kto_desirable_weight=2.0, kto_undesirable_weight=0.5)
    errors = DenoisingErrors(torch.tensor([0.9]), torch.tensor([0.9]), torch.tensor([0.1]), torch.tensor([0.1]))
    r = -0.5 * 2.0 * 0.8  # both rewards -0.8, mean < 0 -> z = 0
    expected = (2.0 * (1 - sigmoid(r)) + 0.5 * (1 - sigmoid(-r))) / 2
    assert get_loss("kto").fn(errors, cfg).loss.item() == pytest.approx(expected, rel=1e-6)


def test_sft_uses_chosen_only():
    out = get_loss("sft").fn(DenoisingErrors(torch.tensor([0.2, 0.4]), torch.tensor([9.0, 9.0])), CFG)
    assert out.loss.item() == pytest.approx(0.3)


def test_user_registered_loss_and_duplicate_name():
    @register_loss("test_hinge", needs_reference=False)
    def hinge(errors, config):
        return LossOutput(loss=torch.relu(1 + errors.policy_chosen - errors.policy_rejected).mean())

    assert "test_hinge" in available_losses()
    assert get_loss("test_hinge").fn(ERRORS, CFG).loss.item() == pytest.approx((0.6 + 1.2) / 2)
    with pytest.raises(ValueError, match="already registered"):
        register_loss("test_hinge", needs_reference=False)(hinge)
