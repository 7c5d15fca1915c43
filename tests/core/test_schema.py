"""Files read back and values given: bounded parsing, typed fields, ranges the machine can hold, and
error messages of bounded length (supcon.core.schema, supcon.core.config)."""

import pytest

from supcon.core.config import Config, load_preset, memory_needed, set_value, validate
from supcon.core.errors import UsageError
from supcon.core.schema import field, load_json, load_yaml, number_list, read_text, short

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9)
)


def test_short_cuts_huge_values():
    assert len(short("x" * 10**6)) <= 100
    assert len(short(10**3000)) <= 100
    assert len(short([[list(range(1000))] * 1000] * 1000)) <= 100
    assert short(5) == "5"


@pytest.mark.parametrize(
    "text, match",
    [
        (ALIAS_BOMB, "aliases"),
        ("a: " + "[" * 5000 + "]" * 5000, "deeper"),
        ("a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 200)), "deeper"),
        ("a: [1, 2", "not valid YAML"),
        ("x" * (2 << 20), "larger than"),
    ],
)
def test_hostile_yaml_is_one_line(text, match):
    with pytest.raises(UsageError, match=match) as e:
        load_yaml(text, "config bomb.yaml")
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300 and "bomb.yaml" in msg


@pytest.mark.parametrize(
    "data, match",
    [(b"\x00\x01\x02ELF", "binary"), (b"\xff\xfe\xfa a: 1", "UTF-8"), (b"a: 1\n" * 300_000, "larger")],
)
def test_binary_or_huge_presets_are_refused(tmp_path, data, match):
    path = tmp_path / "preset.yaml"
    path.write_bytes(data)
    with pytest.raises(UsageError, match=match):
        load_preset(str(path))


def test_an_alias_bomb_preset_is_refused_quickly(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB.replace("a:", "name:", 1))
    with pytest.raises(UsageError, match="aliases"):
        load_preset(str(path))


def test_a_fifo_is_not_read(tmp_path):
    import os

    fifo = tmp_path / "preset.yaml"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="not a regular file"):
        read_text(fifo, "config file")  # opening it would block until a writer came


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a":' * 50 + "1" + "}" * 50, "{", "\x00"])
def test_hostile_json_is_one_line(text):
    with pytest.raises(UsageError) as e:
        load_json(text, "model.json")
    assert "\n" not in str(e.value) and "model.json" in str(e.value)


@pytest.mark.parametrize(
    "data, kind, kwargs, match",
    [
        ({}, "int", {}, "size is missing"),
        ({"size": "abc"}, "int", {}, "must be an integer"),
        ({"size": [16]}, "int", {}, "must be an integer"),
        ({"size": True}, "int", {}, "must be an integer"),
        ({"size": 0}, "int", {"ge": 1}, "at least 1"),
        ({"size": -5}, "int", {"ge": 1}, "at least 1"),
        ({"size": 10**40}, "int", {"le": 4096}, "at most 4096"),
        ({"size": "false"}, "bool", {}, "true or false"),
        ({"size": float("nan")}, "number", {}, "finite number"),
        ({"size": "x"}, "str", {"choices": ("a", "b")}, "one of a, b"),
        ("not a mapping", "int", {}, "must be a mapping"),
    ],
)
def test_fields_name_file_and_key(data, kind, kwargs, match):
    with pytest.raises(UsageError, match=match) as e:
        field(data, "size", kind, "run/model.json", **kwargs)
    assert "run/model.json" in str(e.value)


def test_number_lists_agree_in_length_and_range():
    assert number_list({"std": [1, 2.5]}, "std", "m.json", 2, gt=0) == [1.0, 2.5]
    for bad, match in (
        ([1], "hold 2"),
        ([0, 1], "above 0"),
        (["a", 1], "finite number"),
        ([True, 1], "finite"),
    ):
        with pytest.raises(UsageError, match=match):
            number_list({"std": bad}, "std", "m.json", 2, gt=0)


@pytest.mark.parametrize(
    "assignment, key",
    [
        ("seed=1000000000000000000000000000000", "seed"),
        ("data.image_size=100000", "data.image_size"),
        ("ce.warmup_epochs=1e308", "ce.warmup_epochs"),
        ("model.feature_dim=10000000", "model.feature_dim"),
        ("loss.queue_size=1000000000000", "loss.queue_size"),
        ("pretrain.views=100000", "pretrain.views"),
        ("ce.epochs=99999999999999999999", "ce.epochs"),
        ("ce.weight_decay=1e300", "ce.weight_decay"),
    ],
)
def test_numeric_fields_have_ranges_the_machine_can_hold(assignment, key):
    cfg = Config()
    set_value(cfg, assignment)
    with pytest.raises(UsageError) as e:
        validate(cfg)
    msg = str(e.value)
    assert msg.startswith(key) and "at most" in msg and len(msg) < 200


def test_memory_is_estimated_before_anything_is_allocated():
    cfg = Config()
    set_value(cfg, "model.feature_dim=65536")
    set_value(cfg, "data.image_size=2048")
    assert sum(memory_needed(cfg).values()) > 2**40
    with pytest.raises(UsageError, match="GiB"):
        validate(cfg)
    validate(Config())  # the defaults fit


def test_set_values_are_bounded_in_messages():
    cfg = Config()
    with pytest.raises(UsageError) as e:
        set_value(cfg, "model.encoder=" + "[" + ", ".join(["x"] * 100_000) + "]")
    assert len(str(e.value)) < 300
    with pytest.raises(UsageError) as e:
        set_value(cfg, "x" * 100_000 + "=1")
    assert len(str(e.value)) < 400


@pytest.mark.parametrize(
    "assignment", ["ce.lr=1" + "0" * 400, "name=" + "x" * 100_000, "data.path=" + "p" * 5000]
)
def test_huge_numbers_and_strings_are_one_line(assignment):
    with pytest.raises(UsageError) as e:
        set_value(Config(), assignment)
    assert len(str(e.value)) < 200


def test_names_from_the_command_line_are_printed_cut(capsys):
    from supcon.cli import main

    huge = "x" * 100_000
    for args in (["train-ce", "--epochs", huge], ["train-ce", "--lr", huge], ["train-ce", "--encoder", huge],
                 ["export", "--from", "r", "--format", "onnx", "--space", huge]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and len(err) < 600, err[:300]
