"""Malformed guide and base configs are one line naming the file, the field, the value and what was expected:
when loaded, in `pnpguide doctor`, and on the command line."""

import inspect
import json

import pytest

from pnpguide import config_checks
from pnpguide.loading import default_base_dir, load_pipeline
from pnpguide.cli import main
from pnpguide.config_checks import ConfigError, check_base_configs, check_guide_config
from pnpguide.distill_guidance import GuidanceDistillConfig
from pnpguide.doctor import check_pair
from pnpguide.guide import OutputGuide, ResidualGuide
from pnpguide.loading import load_guide, shipped_guide_dirs


@pytest.fixture(params=[OutputGuide, ResidualGuide], ids=["output", "residual"])
def guide_dir(tiny_components, tmp_path, request):
    guide = request.param.from_unet(tiny_components["unet"])
    guide.register_to_config(trained_guidance_range=(2.0, 9.0))
    guide.save_pretrained(tmp_path / "guide")
    return tmp_path / "guide"


def _set(config_file, **fields):
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | fields))


BAD_GUIDE_FIELDS = [
    (dict(layers_per_block="2"), '"layers_per_block" is "2"; expected a positive integer'),
    (dict(trained_guidance_range="2-9"), '"trained_guidance_range" is "2-9"; expected [w_min, w_max] with 1 <= w_min <= w_max or null'),
    (dict(trained_guidance_range=[9, 2]), '"trained_guidance_range" is [9, 2]; expected'),
    (dict(default_guidance_interval=[1000, 500]), '"default_guidance_interval" is [1000, 500]; expected [t_low, t_high] with 0 <= t_low <= t_high or null'),
    (dict(unet_cross_attention_dim=True), '"unet_cross_attention_dim" is true; expected a positive integer'),
    (dict(width=0), '"width" is 0; expected a positive integer'),
    (dict(trained_timesteps=[999, "749"]), '"trained_timesteps" is [999, "749"]; expected a non-empty list of integers or null'),
    (dict(block_out_channels=[16]), "per-block fields have different lengths (block_out_channels: 1, unet_block_out_channels: 2"),
]


@pytest.mark.parametrize("fields, message", BAD_GUIDE_FIELDS)
def test_a_malformed_guide_config_names_file_field_value_and_expectation(guide_dir, fields, message):
    _set(guide_dir / "config.json", **fields)
    with pytest.raises(ConfigError) as error:
        load_guide(guide_dir)
    assert str(error.value).startswith(f"{guide_dir / 'config.json'}: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_every_bad_field_is_listed_at_once(guide_dir):
    _set(guide_dir / "config.json", layers_per_block="2", norm_eps=-1)
    with pytest.raises(ConfigError, match='"layers_per_block" is "2"; expected a positive integer; "norm_eps" is -1; expected a positive number'):
        load_guide(guide_dir)


@pytest.mark.parametrize("fields, message", [
    (dict(cross_attention_dim="768"), '"cross_attention_dim" is "768"; expected a positive integer'),
    (dict(block_out_channels=[16, "32"]), '"block_out_channels" is [16, "32"]; expected a non-empty list of positive integers'),
    (dict(down_block_types=["DownBlock2D"]), "per-block fields have different lengths (block_out_channels: 2, down_block_types: 1"),
])
def test_a_malformed_base_unet_config_is_named_before_diffusers_reads_it(tiny_base_dir, fields, message):
    _set(tiny_base_dir / "unet" / "config.json", **fields)
    with pytest.raises(ConfigError) as error:
        load_pipeline(tiny_base_dir)
    assert str(error.value).startswith(f"{tiny_base_dir / 'unet' / 'config.json'}: ") and message in str(error.value)


def test_a_malformed_scheduler_config_and_model_index_are_named(tiny_base_dir):
    _set(tiny_base_dir / "scheduler" / "scheduler_config.json", num_train_timesteps="1000")
    with pytest.raises(ConfigError, match='scheduler_config.json: "num_train_timesteps" is "1000"; expected a positive integer'):
        load_pipeline(tiny_base_dir)
    (tiny_base_dir / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="model_index.json holds list JSON; expected a JSON object"):
        load_pipeline(tiny_base_dir)


def test_doctor_reports_malformed_configs_instead_of_raising(tiny_base_dir, guide_dir):
    _set(tiny_base_dir / "unet" / "config.json", cross_attention_dim="768")
    _set(guide_dir / "config.json", trained_guidance_range="2-9")
    checks = {check.name: check for check in check_pair(tiny_base_dir, guide_dir)}
    assert not checks["base folder"].ok and '"cross_attention_dim" is "768"; expected a positive integer' in checks["base folder"].detail
    assert not checks["guide files"].ok and '"trained_guidance_range" is "2-9"' in checks["guide files"].detail


def test_the_cli_reports_a_malformed_guide_config_in_one_line_with_exit_code_2(tiny_base_dir, guide_dir, capsys):
    _set(guide_dir / "config.json", layers_per_block="2")
    assert main(["generate", "--prompt", "a red circle", "--base", str(tiny_base_dir), "--guide", str(guide_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pnpguide generate: error:") and '"layers_per_block" is "2"' in err
    assert main(["doctor", "--base", str(tiny_base_dir), "--guide", str(guide_dir)]) == 1
    assert 'FAIL guide files: ' in capsys.readouterr().out


@pytest.mark.parametrize("design", [OutputGuide, ResidualGuide])
def test_every_guide_argument_has_a_row_in_the_table(design):
    arguments = set(inspect.signature(design.__init__).parameters) - {"self"}
    assert arguments <= set(config_checks.GUIDE_FIELDS), arguments - set(config_checks.GUIDE_FIELDS)


def test_the_shipped_configs_pass():
    for folder in shipped_guide_dirs():
        check_guide_config(folder / "config.json")
    check_base_configs(default_base_dir())


def test_a_training_config_with_a_field_of_the_wrong_type_is_a_clear_error():
    with pytest.raises(ConfigError, match="trajectories is '8'; expected an integer"):
        GuidanceDistillConfig(trajectories="8")
    with pytest.raises(ConfigError, match=r"w_min is \[2\]; expected a number"):
        GuidanceDistillConfig(w_min=[2])
