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
    out = get_loss("diffusion_dpo")(ERRORS, CFG)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert get_loss("dpo")(ERRORS, CFG).loss.item() == pytest.approx(expected, rel=1e-6)


def test_robust_dpo_by_hand_and_unbiased_under_flipped_labels():
    """Robust DPO with flip rate eps = label_smoothing, as TRL writes it, on logits 0.4 and -0.2."""
    eps = 0.2
    cfg = SimpleNamespace(beta=2.0, label_smoothing=eps)
    ls = math.log(sigmoid(0.4)), math.log(sigmoid(-0.2))  # log p of each pair
    ls_flipped = math.log(sigmoid(-0.4)), math.log(sigmoid(0.2))  # log (1 - p)
    robust = sum((-(1 - eps) * a + eps * b) / (1 - 2 * eps) for a, b in zip(ls, ls_flipped)) / 2
    assert get_loss("robust")(ERRORS, cfg).loss.item() == pytest.approx(robust, rel=1e-6)
    assert robust == pytest.approx(0.62224, abs=1e-5)  # the literal value, not the same formula twice
    # Its defining property: averaged over a label flipped with probability eps, it is the clean Diffusion-DPO loss.
    flipped = DenoisingErrors(ERRORS.policy_rejected, ERRORS.policy_chosen, ERRORS.ref_rejected, ERRORS.ref_chosen)
    expected = (1 - eps) * get_loss("robust")(ERRORS, cfg).loss + eps * get_loss("robust")(flipped, cfg).loss
    torch.testing.assert_close(expected, get_loss("diffusion_dpo")(ERRORS, cfg).loss)
    # eps = 0 is Diffusion-DPO exactly; Diffusion-DPO itself does not read label_smoothing (as TRL's sigmoid)
    dpo = get_loss("diffusion_dpo")(ERRORS, CFG).loss
    assert torch.equal(get_loss("robust")(ERRORS, SimpleNamespace(beta=2.0, label_smoothing=0.0)).loss, dpo)
    assert torch.equal(get_loss("diffusion_dpo")(ERRORS, cfg).loss, dpo)


def test_poly_dpo_by_hand():
    a = CFG.poly_alpha
    expected = sum(-math.log(sigmoid(z)) + a * (1 - sigmoid(z)) for z in logits_by_hand()) / 2
    out = get_loss("poly_dpo")(ERRORS, CFG)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    # The factor on Diffusion-DPO's gradient, 1 + alpha p, averaged over the pairs: logits 0.4 and -0.2.
    assert out.metrics["poly_dpo/grad_scale"].item() == pytest.approx(1 + a * (sigmoid(0.4) + sigmoid(-0.2)) / 2)
    assert out.metrics["poly_dpo/grad_scale"].item() == pytest.approx(1.2622, abs=1e-4)


def test_poly_dpo_with_alpha_zero_equals_diffusion_dpo_exactly():
    torch.manual_seed(0)
    errors = DenoisingErrors(*(torch.rand(16) for _ in range(4)))
    cfg = SimpleNamespace(beta=5000.0, poly_alpha=0.0)
    poly = get_loss("poly_dpo")(errors, cfg).loss
    dpo = get_loss("diffusion_dpo")(errors, cfg).loss
    assert torch.equal(poly, dpo)


@pytest.mark.parametrize("alpha", [-1.0, -0.5, 0.0, 0.5, 8.0])
def test_poly_dpo_gradient_matches_closed_form(alpha):
    torch.manual_seed(1)
    pc = torch.rand(6, dtype=torch.float64, requires_grad=True)
    pr, rc, rr = (torch.rand(6, dtype=torch.float64) for _ in range(3))
    cfg = SimpleNamespace(beta=3.0, poly_alpha=alpha)
    get_loss("poly_dpo")(DenoisingErrors(pc, pr, rc, rr), cfg).loss.backward()

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
    assert get_loss("mapo")(errors, CFG).loss.item() == pytest.approx(expected, rel=1e-5)


def test_kto_by_hand():
    beta = CFG.beta
    r_w = [-0.5 * beta * (0.2 - 0.4), -0.5 * beta * (0.5 - 0.4)]  # [0.2, -0.1]
    r_l = [-0.5 * beta * (0.6 - 0.4), -0.5 * beta * (0.3 - 0.4)]  # [-0.2, 0.1]
    z = max(0.0, sum(r_w + r_l) / 4)
    terms = [1 - sigmoid(r - z) for r in r_w] + [1 - sigmoid(z - r) for r in r_l]
    expected = sum(terms) / 4
    assert get_loss("kto")(ERRORS, CFG).loss.item() == pytest.approx(expected, rel=1e-6)


def test_kto_reference_point_is_clamped_at_zero_and_weighted():
    cfg = SimpleNamespace(beta=2.0, kto_desirable_weight=2.0, kto_undesirable_weight=0.5)
    errors = DenoisingErrors(torch.tensor([0.9]), torch.tensor([0.9]), torch.tensor([0.1]), torch.tensor([0.1]))
    r = -0.5 * 2.0 * 0.8  # both rewards -0.8, mean < 0 -> z = 0
    expected = (2.0 * (1 - sigmoid(r)) + 0.5 * (1 - sigmoid(-r))) / 2
    assert get_loss("kto")(errors, cfg).loss.item() == pytest.approx(expected, rel=1e-6)


def test_kto_with_a_positive_reference_point_by_literal_value():
    # beta 20: rewards r_w = [3, 1], r_l = [-1, 2], so z = mean = 1.25 > 0 and it matters:
    # mean(1 - s(3 - z), 1 - s(1 - z), 1 - s(z + 1), 1 - s(z - 2)) = 0.371188 (0.366526 if z were dropped).
    cfg = SimpleNamespace(beta=20.0, kto_desirable_weight=1.0, kto_undesirable_weight=1.0)
    errors = DenoisingErrors(
        policy_chosen=torch.tensor([0.1, 0.3], dtype=torch.float64),
        policy_rejected=torch.tensor([0.5, 0.2], dtype=torch.float64),
        ref_chosen=torch.tensor([0.4, 0.4], dtype=torch.float64),
        ref_rejected=torch.tensor([0.4, 0.4], dtype=torch.float64),
    )
    out = get_loss("kto")(errors, cfg)
    assert out.metrics["kto/reference_point"].item() == pytest.approx(1.25)
    assert out.loss.item() == pytest.approx(0.371188, abs=1e-6)


def test_mapo_in_its_unsaturated_range_by_literal_value():
    # Errors 0.004 apart: the x1000 log-odds are 0.983 and -0.713, where logsigmoid is far from min(x, 0).
    # mean(e_w) - 0.1 * mean(logsigmoid(x)) = 0.271478 (min(x, 0) instead would give 0.235636).
    errors = DenoisingErrors(
        torch.tensor([0.100, 0.300], dtype=torch.float64), torch.tensor([0.104, 0.297], dtype=torch.float64)
    )
    out = get_loss("mapo")(errors, CFG)
    assert out.loss.item() == pytest.approx(0.271478, abs=1e-6)
    assert out.metrics["mapo/accuracies"].item() == 0.5


def test_sft_uses_chosen_only():
    out = get_loss("sft")(DenoisingErrors(torch.tensor([0.2, 0.4]), torch.tensor([9.0, 9.0])), CFG)
    assert out.loss.item() == pytest.approx(0.3)


def test_hinge_and_ipo_match_the_diffusers_dpo_example():
    # diffusers' example: logits_ex = ref_diff - model_diff (diff = e_w - e_l); hinge relu(1 - beta_dpo * logits_ex),
    # ipo (logits_ex - 1 / (2 * beta_dpo))^2, with beta_dpo = beta / 2 = 1 here.
    beta_dpo = CFG.beta / 2
    ref_diff = ERRORS.ref_chosen - ERRORS.ref_rejected
    logits_ex = ref_diff - (ERRORS.policy_chosen - ERRORS.policy_rejected)  # [0.4, -0.2]
    hinge_example = torch.relu(1 - beta_dpo * logits_ex).mean().item()
    ipo_example = ((logits_ex - 1 / (2 * beta_dpo)) ** 2).mean().item()
    assert get_loss("hinge")(ERRORS, CFG).loss.item() == pytest.approx(hinge_example, rel=1e-6)
    assert get_loss("ipo")(ERRORS, CFG).loss.item() == pytest.approx(ipo_example, rel=1e-6)
    # By hand: hinge (0.6 + 1.2) / 2; ipo ((0.4 - 0.5)^2 + (-0.2 - 0.5)^2) / 2.
    assert hinge_example == pytest.approx(0.9) and ipo_example == pytest.approx(0.25)
    assert get_loss("hinge").needs_reference and get_loss("ipo").needs_reference


def test_a_loss_declares_its_own_parameters():
    from dataclasses import dataclass

    from vipo_trl import PolyDPOConfig

    @dataclass
    class MarginParams:
        margin: float = 1.0

    @register_loss("test_margin_hinge", needs_reference=True, params=MarginParams)
    def margin_hinge(errors, config, params):
        logits = (
            -0.5
            * config.beta
            * ((errors.policy_chosen - errors.policy_rejected) - (errors.ref_chosen - errors.ref_rejected))
        )
        return LossOutput(loss=torch.relu(params.margin - logits).mean())

    spec = get_loss("test_margin_hinge")
    assert spec(ERRORS, CFG).loss.item() == pytest.approx((0.6 + 1.2) / 2)  # default margin 1
    cfg = SimpleNamespace(beta=2.0, loss_params={"test_margin_hinge": {"margin": 2.0}})
    assert spec(ERRORS, cfg).loss.item() == pytest.approx((1.6 + 2.2) / 2)
    config = PolyDPOConfig(
        output_dir="unused",
        report_to=[],
        loss_type="test_margin_hinge",
        loss_params='{"test_margin_hinge": {"margin": 3.0}}',
    )  # a JSON string, as on the CLI
    assert config.loss_params == {"test_margin_hinge": {"margin": 3.0}}
    with pytest.raises(ValueError, match="no parameter 'margn'.*Did you mean 'margin'"):
        PolyDPOConfig(
            output_dir="unused",
            report_to=[],
            loss_type="test_margin_hinge",
            loss_params={"test_margin_hinge": {"margn": 3.0}},
        )
    with pytest.raises(ValueError, match="loss_params names 'poly_dpo', which is not in loss_type"):
        PolyDPOConfig(
            output_dir="unused", report_to=[], loss_type="test_margin_hinge", loss_params={"poly_dpo": {"x": 1}}
        )


def test_user_registered_loss_and_duplicate_name():
    @register_loss("test_hinge", needs_reference=False)
    def hinge(errors, config):
        return LossOutput(loss=torch.relu(1 + errors.policy_chosen - errors.policy_rejected).mean())

    assert "test_hinge" in available_losses()
    assert get_loss("test_hinge")(ERRORS, CFG).loss.item() == pytest.approx((0.6 + 1.2) / 2)
    with pytest.raises(ValueError, match="already registered"):
        register_loss("test_hinge", needs_reference=False)(hinge)
