import pytest

from supcon.config import Config, load_preset, preset_names, set_value, validate
from supcon.errors import UsageError


def test_keras_example_preset_is_the_seed_recipe():
    cfg = load_preset("keras-example")
    assert cfg.model.encoder == "keras-cnn" and cfg.model.dropout == 0.5
    assert cfg.loss.variant == "npairs" and cfg.loss.temperature == 0.05
    for phase in (cfg.ce, cfg.pretrain, cfg.linear):
        assert (phase.epochs, phase.batch_size, phase.optimizer, phase.lr, phase.eps) == (
            50,
            256,
            "adam",
            1e-3,
            1e-7,
        )
        assert phase.augment == "none"


def test_every_preset_loads_and_validates():
    for name in preset_names():
        validate(load_preset(name))


def test_unknown_preset_lists_names():
    with pytest.raises(UsageError, match="keras-example"):
        load_preset("nope")


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("pretrain:\n  epochz: 3\n")
    with pytest.raises(UsageError, match="pretrain.epochz"):
        load_preset(str(f))


def test_wrong_type_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("pretrain:\n  epochs: many\n")
    with pytest.raises(UsageError, match="pretrain.epochs"):
        load_preset(str(f))


def test_set_overrides_and_types():
    cfg = Config()
    set_value(cfg, "pretrain.lr=0.5")
    set_value(cfg, "model.blocks=[1, 1, 1, 1]")
    set_value(cfg, "data.image_size=null")
    assert cfg.pretrain.lr == 0.5 and cfg.model.blocks == [1, 1, 1, 1] and cfg.data.image_size is None
    with pytest.raises(UsageError, match="loss.temperature"):
        set_value(cfg, "loss.temperature=hot")
    with pytest.raises(UsageError, match="key=value"):
        set_value(cfg, "loss.temperature")


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("ce.epochs=0", "ce.epochs"),
        ("pretrain.batch_size=-1", "batch_size"),
        ("loss.temperature=0", "temperature"),
        ("loss.variant=cosine", "loss.variant"),
        ("precision=fp8", "precision"),
    ],
)
def test_validate_rejects_nonsense(assignment, message):
    cfg = Config()
    set_value(cfg, assignment)
    with pytest.raises(UsageError, match=message):
        validate(cfg)


def test_yaml_round_trip(tmp_path):
    cfg = load_preset("keras-example")
    cfg.seed = 7
    f = tmp_path / "c.yaml"
    f.write_text(cfg.to_yaml())
    assert load_preset(str(f)) == cfg
