"""Analytic parameter counts and the describe CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

from megatron_vlm import describe
from megatron_vlm.config import EncoderConfig, ProjectorConfig, load_config
from megatron_vlm.model import param_count
from megatron_vlm.model.param_count import (
    decoder_parameters,
    encoder_parameters,
    model_parameters,
    projector_parameters,
)

VISION_MODULE = "megatron_vlm.model.vision_encoder"
FAKE_ENCODER_PARAMS = 1234


@pytest.fixture
def fake_encoder_count(monkeypatch):
    """Stand in for the vision encoder module's count, whether or not the module exists."""
    module = types.ModuleType(VISION_MODULE)
    module.count_encoder_parameters = lambda encoder_cfg: FAKE_ENCODER_PARAMS
    monkeypatch.setitem(sys.modules, VISION_MODULE, module)


def test_1b_decoder_matches_dclm_1b():
    assert decoder_parameters(load_config("1b").model.decoder) == 1_439_893_504


def test_79m_decoder_in_range():
    assert 75_000_000 < decoder_parameters(load_config("79m").model.decoder) < 85_000_000


def test_decoder_count_by_hand():
    # tiny: d=64, ffn=256*ceil(170/256)=256, vocab 512, 2 layers
    d, ffn, vocab = 64, 256, 512
    per_layer = 4 * d * d + 2 * d + 3 * d * ffn + 2 * d
    decoder = load_config("tiny").model.decoder
    assert decoder_parameters(decoder) == 2 * vocab * d + 2 * per_layer + d
    no_qk = load_config("tiny", ["model.decoder.qk_norm=false"]).model.decoder
    assert decoder_parameters(decoder) - decoder_parameters(no_qk) == 2 * (2 * d)


def test_projector_counts_by_hand():
    siglip = EncoderConfig()  # d_enc 1152
    mlp2 = ProjectorConfig(type="mlp2", hidden_multiplier=4, bias=True)
    assert projector_parameters(mlp2, siglip, 2048) == (1152 * 4608 + 4608) + (4608 * 2048 + 2048)
    assert projector_parameters(mlp2, siglip, 2048) == 14_752_256
    mlp2_nobias = ProjectorConfig(type="mlp2", bias=False)
    assert projector_parameters(mlp2_nobias, siglip, 2048) == 14_745_600
    linear = ProjectorConfig(type="linear", bias=True)
    assert projector_parameters(linear, siglip, 2048) == 1152 * 2048 + 2048 == 2_361_344
    assert projector_parameters(ProjectorConfig(type="linear", bias=False), siglip, 512) == 589_824


def test_model_parameters_sum_and_trainable(fake_encoder_count):
    model = load_config("1b").model
    counts = model_parameters(model)
    assert counts["encoder"] == FAKE_ENCODER_PARAMS
    assert counts["total"] == counts["decoder"] + counts["projector"] + counts["encoder"]
    assert counts["trainable"] == counts["total"] - FAKE_ENCODER_PARAMS  # frozen encoder
    unfrozen = load_config("1b", ["model.encoder.frozen=false", "model.encoder.mode=online"])
    assert model_parameters(unfrozen.model)["trainable"] == counts["total"]


def test_missing_vision_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, VISION_MODULE, None)  # makes the import fail
    with pytest.raises(RuntimeError, match="vision_encoder"):
        encoder_parameters(EncoderConfig())


def test_describe_json(fake_encoder_count, capsys):
    assert describe.main(["--recipe", "1b", "--json", "model.projector.type=linear"]) == 0
    info = json.loads(capsys.readouterr().out)
    for part in ("decoder", "projector", "encoder", "total"):
        assert isinstance(info[part], int)
    assert info["total"] == info["decoder"] + info["projector"] + info["encoder"]
    assert info["decoder"] == 1_439_893_504
    assert info["projector"] == 2_361_344
    assert info["recipe"] == "1b"


def test_describe_table_and_errors(fake_encoder_count, capsys):
    assert describe.main(["--recipe", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "decoder" in out and "total" in out and f"{FAKE_ENCODER_PARAMS:,}" in out
    assert describe.main(["--recipe", "tiny", "train.lr=abc"]) == 1
    assert "train.lr" in capsys.readouterr().err
    # the layout checks training makes: 4 heads do not split over TP=3
    assert describe.main(["--recipe", "tiny", "parallel.tensor_parallel=3"]) == 1
    assert capsys.readouterr().err.strip() == ("describe: error: model.decoder.num_attention_heads"
                                               "=4 is not divisible by parallel.tensor_parallel=3")
    assert describe.main(["--recipe", "tiny", "parallel.data_parallel=3"]) == 1
    assert "train.global_batch_size=8 is not divisible" in capsys.readouterr().err


def test_describe_help_lists_config_keys():
    result = subprocess.run([sys.executable, "-m", "megatron_vlm.describe", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--recipe" in result.stdout
    assert "model.decoder.hidden_size" in result.stdout


def test_real_encoder_count_in_describe(capsys):
    from megatron_vlm.model.vision_encoder import count_encoder_parameters

    cfg = load_config("tiny")
    n = count_encoder_parameters(cfg.model.encoder)
    assert isinstance(n, int) and n > 0
    assert describe.main(["--recipe", "tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["encoder"] == n
    assert info["total"] == info["decoder"] + info["projector"] + info["encoder"]
    assert param_count.encoder_parameters(cfg.model.encoder) == n
