"""PolyDPOConfig: out-of-range values fail at construction, naming the field."""

import pytest

from vipo_trl import PolyDPOConfig


def make(**kw):
    return PolyDPOConfig(output_dir="unused", report_to=[], **kw)


def test_defaults_and_single_loss_normalised():
    cfg = make(loss_type="poly_dpo")
    assert cfg.loss_type == ["poly_dpo"] and cfg.loss_weights == [1.0]
    assert cfg.remove_unused_columns is False
    assert cfg.frozen_dtype_name == "float32"


def test_combined_losses_with_weights():
    cfg = make(loss_type=["poly_dpo", "sft"], loss_weights=[1.0, 0.1])
    assert cfg.loss_weights == [1.0, 0.1]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"beta": 0}, "beta"),
        ({"beta": -5}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"poly_alpha": -1.5}, "poly_alpha"),
        ({"poly_alpha": float("inf")}, "poly_alpha"),
        ({"resolution": 0}, "resolution"),
        ({"dataset_schema": "coco"}, "dataset_schema"),
        ({"timestep_sampling": "cosine"}, "timestep_sampling"),
        ({"torch_dtype": "int8"}, "torch_dtype"),
        ({"mapo_snr": 0}, "mapo_snr"),
        ({"label_smoothing": 0.5, "loss_type": "robust"}, "label_smoothing"),
        ({"label_smoothing": -0.1, "loss_type": "dpo"}, "label_smoothing"),
        ({"proportion_empty_prompts": 1.0}, "proportion_empty_prompts"),
        ({"proportion_empty_prompts": -0.1}, "proportion_empty_prompts"),
        ({"proportion_empty_prompts": float("nan")}, "proportion_empty_prompts"),
        # language-model-only TrainingArguments: transformers would fail at the first step on a denoiser
        ({"neftune_noise_alpha": 5.0}, "neftune_noise_alpha"),
        ({"use_liger_kernel": True}, "use_liger_kernel"),
    ],
)
def test_out_of_range_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"PolyDPOConfig.{field}="):
        make(**kwargs)


def test_a_loss_setting_that_no_selected_loss_reads_is_warned(recwarn):
    make(loss_type="robust", label_smoothing=0.1)
    make(loss_type=["robust", "sft"], label_smoothing=0.1)
    make(loss_type="poly_dpo", label_smoothing=0.0)
    make(loss_type=["poly_dpo", "sft"], poly_alpha=8.0)
    make(loss_type="mapo", mapo_beta=0.5, poly_alpha=0.0)  # a setting left at its default is not "set"
    assert not [w for w in recwarn if "has no effect" in str(w.message)]
    with pytest.warns(UserWarning, match=r"label_smoothing=0.1 has no effect.*loss_type is \['dpo', 'mapo'\]"):
        make(loss_type=["dpo", "mapo"], label_smoothing=0.1)  # TRL's sigmoid does not read it either
    with pytest.warns(UserWarning, match=r"poly_alpha=8.0 has no effect: only the losses \['poly_dpo'\] read it"):
        make(loss_type="diffusion_dpo", poly_alpha=8.0)
    with pytest.warns(UserWarning, match=r"kto_undesirable_weight=2.0 has no effect"):
        make(loss_type="poly_dpo", kto_undesirable_weight=2.0)


def test_a_loss_of_the_users_own_may_read_any_setting(recwarn):
    from vipo_trl.losses import LossOutput, register_loss

    @register_loss("test_reads_poly_alpha", needs_reference=False, override=True)
    def reads_poly_alpha(errors, config):
        return LossOutput(errors.policy_chosen.mean() * config.poly_alpha, {})

    make(loss_type="test_reads_poly_alpha", poly_alpha=3.0)
    assert not [w for w in recwarn if "has no effect" in str(w.message)]


def test_unknown_loss_lists_available():
    with pytest.raises(ValueError, match="Unknown loss 'poly'.*poly_dpo"):
        make(loss_type="poly")


def test_weights_must_match_losses():
    with pytest.raises(ValueError, match="loss_weights` has 1 entries but `loss_type` has 2"):
        make(loss_type=["poly_dpo", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="loss_weights"):
        make(loss_type=["poly_dpo"], loss_weights=[-1.0])


def test_alpha_minus_one_is_allowed_and_bf16_sets_frozen_dtype():
    assert make(poly_alpha=-1.0).poly_alpha == -1.0
    assert make(torch_dtype="bfloat16").frozen_dtype_name == "bfloat16"
