import pytest

from supcon.core.config import Config, load_preset, preset_names, set_value, validate
from supcon.core.errors import UsageError


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
    with pytest.raises(UsageError, match=message):  # choices are refused when set, ranges on validate
        set_value(cfg, assignment)
        validate(cfg)


def test_yaml_round_trip(tmp_path):
    cfg = load_preset("keras-example")
    cfg.seed = 7
    f = tmp_path / "c.yaml"
    f.write_text(cfg.to_yaml())
    assert load_preset(str(f)) == cfg


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("loss.temperature=.inf", "loss.temperature must be a finite number"),
        ("pretrain.lr=.nan", "pretrain.lr must be a finite number"),
        ("ce.eps=-1e-8", "ce.eps must be greater than 0"),
        ("model.feature_dim=0", "model.feature_dim must be at least 1"),
        ("model.dropout=1.5", "model.dropout must be below 1"),
        ("knn_k=0", "knn_k must be at least 1"),
        ("device=meta", "device 'meta' cannot train"),
        ("device=gpu7", "unknown device 'gpu7'"),
        ("data.val_fraction=1.0", "data.val_fraction must be below 1"),
        ("linear.momentum=-0.1", "linear.momentum must be at least 0"),
        ("model.blocks=[1, 0]", "model.blocks"),
        ("checkpoint_every=0", "checkpoint_every must be at least 1"),
    ],
)
def test_every_field_is_validated_with_its_range(assignment, message):
    cfg = Config()
    set_value(cfg, assignment)
    with pytest.raises(UsageError, match=message.replace(".", r"\.")):
        validate(cfg)


def test_values_set_in_python_are_type_checked_too():
    cfg = Config()
    cfg.loss.variant = "bogus"
    with pytest.raises(UsageError, match="loss.variant must be one of: out, in, npairs"):
        validate(cfg)


@pytest.mark.parametrize(
    "assignment",
    ["pretrain.batch_size=1", "loss.method=simclr"],
)
def test_contrastive_training_without_any_positive_is_refused(assignment):
    cfg = Config()  # the Keras example: one view per image, no augmentation
    set_value(cfg, assignment)
    with pytest.raises(UsageError, match="no anchor ever has a positive"):
        validate(cfg)


def test_yaml_errors_name_the_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("pretrain:\n  epochs: 3\n  lr: [0.1\n")
    with pytest.raises(UsageError, match=r"line \d+, column \d+"):
        load_preset(str(f))


def test_choices_come_from_the_config_types():
    from supcon.cli import build_parser
    from supcon.core.config import Precision, choices

    compare = build_parser()._subparsers._group_actions[0].choices["compare"]
    precision = next(a for a in compare._actions if a.dest == "precision")
    assert tuple(precision.choices) == choices(Precision) == ("auto", "fp32", "bf16", "fp16")
