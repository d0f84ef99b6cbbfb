"""Config tree: recipes, inheritance, overrides, validation, dump/load, help text."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

from megatron_vlm.config import (
    DecoderConfig,
    EncoderConfig,
    ModelConfig,
    ParallelConfig,
    ProjectorConfig,
    RunConfig,
    TrainConfig,
    available_recipes,
    config_keys,
    config_to_dict,
    dump_config,
    field_docs,
    format_help,
    load_config,
    non_default_values,
)


SECTIONS = (RunConfig, ModelConfig, DecoderConfig, ProjectorConfig, EncoderConfig, ParallelConfig,
            TrainConfig)


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("name", ["tiny", "79m", "1b", "7b"])
def test_shipped_recipe_loads_and_validates_at_its_layout(name):
    cfg = load_config(name)
    assert cfg.name == name
    world_size = cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel
    assert cfg.validate_parallel(world_size) == 1
    assert cfg.parallel.data_parallel == 1


def test_available_recipes():
    assert set(available_recipes()) >= {"tiny", "79m", "1b", "7b"}


def test_recipe_shapes():
    one_b = load_config("1b").model.decoder
    assert (one_b.num_layers, one_b.hidden_size, one_b.num_attention_heads) == (24, 2048, 16)
    assert one_b.head_dim == 128 and one_b.resolved_ffn_hidden_size() == 5632
    assert load_config("7b").parallel.tensor_parallel == 2
    tiny = load_config("tiny").model.encoder
    assert tiny.open_clip_model == "custom" and tiny.num_image_tokens == 16


def test_every_field_has_a_docstring_and_help_lists_it():
    text = format_help()
    for key in config_keys():
        assert key in text
    for cls in SECTIONS:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
    assert "model.decoder.hidden_size  (int, required)" in text
    assert 'model.projector.type  (str, "mlp2")' in text


def test_unknown_key_in_file_names_key_file_and_suggestion(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml",
                      {"base": "tiny", "model": {"decoder": {"hiden_size": 8}}})
    with pytest.raises(ValueError) as err:
        load_config(path)
    message = str(err.value)
    assert "model.decoder.hiden_size" in message
    assert "bad.yaml" in message
    assert "model.decoder.hidden_size" in message


def test_unknown_override_key_names_key():
    with pytest.raises(ValueError, match=r"train\.weight_decy.*did you mean train\.weight_decay"):
        load_config("tiny", ["train.weight_decy=1"])


def test_override_values_are_yaml_and_typed():
    cfg = load_config("tiny", ["train.lr=1e-3", "model.decoder.qk_norm=false",
                               "train.fp8=null", "parallel.data_parallel=2",
                               "model.decoder.ffn_hidden_size=128", "train.train_iters=1e3",
                               "model.projector={type: linear}"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.model.decoder.qk_norm is False
    assert cfg.train.fp8 is None
    assert cfg.parallel.data_parallel == 2
    assert cfg.model.decoder.resolved_ffn_hidden_size() == 128
    assert cfg.train.train_iters == 1000 and isinstance(cfg.train.train_iters, int)
    assert cfg.model.projector.type == "linear"
    assert cfg.model.projector.hidden_multiplier == 4  # a section override merges


@pytest.mark.parametrize("override, key", [
    ("model.decoder.num_layers=abc", "model.decoder.num_layers"),
    ("model.decoder.qk_norm=3", "model.decoder.qk_norm"),
    ("train.lr=fast", "train.lr"),
    ("model.decoder.num_layers=2.5", "model.decoder.num_layers"),
    ("name=[1, 2]", "name"),
])
def test_override_type_error_names_key(override, key):
    with pytest.raises(ValueError, match=rf"{key}: expected"):
        load_config("tiny", [override])


def test_override_syntax_errors():
    with pytest.raises(ValueError, match="dotted.key=value"):
        load_config("tiny", ["train.lr"])
    with pytest.raises(ValueError, match="not a section"):
        load_config("tiny", ["model.encoder.custom_vision_cfg.width=64"])
    # YAML that does not parse: one line naming the override and where in it
    with pytest.raises(ValueError) as err:
        load_config("tiny", ["data.ratios={text: [1}"])
    assert str(err.value).startswith("override 'data.ratios={text: [1}': not valid YAML at line "
                                     "1, column 10: expected ")
    assert "\n" not in str(err.value) and err.value.__cause__ is None


def test_yaml_syntax_error_in_a_config_file_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\ntrain:\n  lr: 1e-3\n  micro_batch_size: [2\n")
    with pytest.raises(ValueError) as err:
        load_config(str(path))
    message = str(err.value)
    assert message.startswith(f"recipe {path}: not valid YAML at line 5, column 1: "), message
    # the same through an entry point: one line, no traceback
    proc = subprocess.run([sys.executable, "-m", "megatron_vlm.describe", "--recipe", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"describe: error: {message}"


@pytest.mark.parametrize("override, message", [
    ("model.decoder.hidden_size=65", "model.decoder.hidden_size=65 is not divisible by "
                                     "model.decoder.num_attention_heads=4"),
    ("model.decoder.num_layers=0", "model.decoder.num_layers=0 must be positive"),
    ("model.projector.type=mlp3", "model.projector.type='mlp3' must be one of"),
    ("model.encoder.mode=live", "model.encoder.mode='live' must be one of"),
    ("model.encoder.custom_vision_cfg=null", "model.encoder.custom_vision_cfg=None is required"),
    ("train.params_dtype=fp16", "train.params_dtype='fp16' must be one of"),
    ("train.fp8=e5m2", "train.fp8='e5m2' must be one of"),
    ("train.global_batch_size=7", "train.global_batch_size=7 is not divisible by "
                                  "train.micro_batch_size=2"),
    ("train.seq_length=512",
     "train.seq_length=512 is larger than model.decoder.max_seq_length=256"),
    ("model.encoder.frozen=false", "model.encoder.mode='precomputed' cannot train"),
    ("model.encoder.num_image_tokens=17", "(image_size // patch_size) ** 2=16 does not match"),
    ("parallel.backend=mpi", "parallel.backend='mpi' must be one of"),
])
def test_validation_messages_name_the_field(override, message):
    with pytest.raises(ValueError) as err:
        load_config("tiny", [override])
    assert message in str(err.value)


def test_named_encoder_rejects_custom_cfg():
    with pytest.raises(ValueError, match="custom_vision_cfg.*only used with"):
        load_config("tiny", ["model.encoder.open_clip_model=ViT-SO400M-14-SigLIP-384"])
    cfg = load_config("tiny", ["model.encoder.open_clip_model=ViT-SO400M-14-SigLIP-384",
                               "model.encoder.custom_vision_cfg=null"])
    assert cfg.model.encoder.custom_vision_cfg is None


def test_sections_validate_on_their_own():
    with pytest.raises(ValueError, match="model.decoder.vocab_size=-1 must be positive"):
        DecoderConfig(num_layers=1, hidden_size=8, num_attention_heads=2, vocab_size=-1,
                      max_seq_length=8)
    with pytest.raises(ValueError, match="train.min_lr=0.1 is larger than train.lr=0.01"):
        TrainConfig(lr=0.01, min_lr=0.1)
    assert EncoderConfig().num_image_tokens == 729
    assert DecoderConfig(num_layers=1, hidden_size=2048, num_attention_heads=16, vocab_size=8,
                         max_seq_length=8).resolved_ffn_hidden_size() == 5632


def test_missing_required_keys(tmp_path):
    path = write_yaml(tmp_path / "partial.yaml", {"model": {"decoder": {"num_layers": 2}}})
    with pytest.raises(ValueError, match="missing required config keys: model.decoder.hidden_size"):
        load_config(path)


def test_tp_not_dividing_heads():
    cfg = load_config("tiny", ["parallel.tensor_parallel=8"])
    with pytest.raises(ValueError) as err:
        cfg.validate_parallel(8)
    assert str(err.value) == ("model.decoder.num_attention_heads=4 is not divisible by "
                              "parallel.tensor_parallel=8")


@pytest.mark.parametrize("overrides, world_size, message", [
    (["parallel.tensor_parallel=2"], 3, "world size 3 is not divisible"),
    (["parallel.data_parallel=2"], 4, "!= world size 4"),
    (["parallel.pipeline_parallel=4"], 4, "model.decoder.num_layers=2 is not divisible by "
                                          "parallel.pipeline_parallel=4"),
    (["model.decoder.vocab_size=510", "parallel.tensor_parallel=4"], 4,
     "model.decoder.vocab_size=510 is not divisible"),
    (["model.decoder.ffn_hidden_size=130", "parallel.tensor_parallel=4"], 4,
     "model.decoder.ffn_hidden_size (resolved)=130 is not divisible"),
    ([], 8, "train.global_batch_size=8 is not divisible by train.micro_batch_size * "
            "data-parallel size=2 * 8"),
])
def test_validate_parallel_errors(overrides, world_size, message):
    with pytest.raises(ValueError) as err:
        load_config("tiny", overrides).validate_parallel(world_size)
    assert message in str(err.value)


def test_validate_parallel_projector_hidden_divisible_by_tp(tmp_path):
    path = write_yaml(tmp_path / "odd.yaml", {"base": "tiny", "model": {"encoder": {
        "embed_dim": 30, "custom_vision_cfg": {"image_size": 56, "patch_size": 14, "width": 30}}}})
    cfg = load_config(path, ["model.projector.hidden_multiplier=1", "parallel.tensor_parallel=4"])
    with pytest.raises(ValueError, match=r"hidden_multiplier \* model.encoder.embed_dim=30"):
        cfg.validate_parallel(4)
    linear = load_config(path, ["model.projector.type=linear", "parallel.tensor_parallel=4"])
    assert linear.validate_parallel(4) == 1


def test_validate_parallel_resolves_data_parallel():
    cfg = load_config("tiny", ["parallel.tensor_parallel=2"])
    assert cfg.parallel.data_parallel is None
    assert cfg.validate_parallel(4) == 2
    assert cfg.parallel.data_parallel == 2


def test_inheritance_via_base(tmp_path):
    parent = write_yaml(tmp_path / "parent.yaml",
                        {"base": "tiny", "name": "parent", "train": {"lr": 1e-4, "train_iters": 5}})
    (tmp_path / "sub").mkdir()
    child = write_yaml(tmp_path / "sub" / "child.yaml",
                       {"base": "../parent.yaml", "name": "child", "train": {"train_iters": 7}})
    cfg = load_config(child, ["seed=1"])
    assert (cfg.name, cfg.seed) == ("child", 1)
    assert cfg.train.train_iters == 7
    assert cfg.train.lr == 1e-4  # from parent
    assert cfg.model.decoder.hidden_size == 64  # from tiny
    assert cfg.model.encoder.custom_vision_cfg["patch_size"] == 14


def test_inheritance_cycle_and_unknown_recipe(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    write_yaml(a, {"base": "b.yaml"})
    write_yaml(b, {"base": "a.yaml"})
    with pytest.raises(ValueError, match="cycle"):
        load_config(str(a))
    with pytest.raises(ValueError, match="unknown recipe 'tinny'.*'tiny'"):
        load_config("tinny")
    with pytest.raises(ValueError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_dump_load_round_trip(tmp_path):
    cfg = load_config("tiny", ["train.lr=2e-4", "model.projector.type=linear", "seed=7"])
    path = dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert "base" not in yaml.safe_load(path.read_text())
    again = load_config(str(path))
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)


def test_non_default_values():
    cfg = load_config("tiny", ["seed=5", "train.lr=1e-3"])
    values = non_default_values(cfg)
    assert values["seed"] == 5
    assert values["model.decoder.hidden_size"] == 64  # required fields are always listed
    assert values["model.encoder.num_image_tokens"] == 16
    assert "train.lr" not in values  # equals the default again
    assert "name" not in values and "model.projector.type" not in values
    assert values["train.train_iters"] == 30
