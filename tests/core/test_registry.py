"""Registries: a decorator and a dict, with families (``prefix:name``) and one-line errors."""

import pytest

from supcon.core.errors import UsageError
from supcon.core.registry import Registry


def test_register_get_and_names():
    reg = Registry("widget")

    @reg.register("a")
    def make_a(**kw):
        return ("a", kw)

    assert reg.get("a")(x=1) == ("a", {"x": 1})
    assert "a" in reg and "b" not in reg
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(make_a)
    with pytest.raises(UsageError, match=r"unknown widget 'b'; choose one of: a$"):
        reg.get("b")


def test_a_family_takes_every_prefixed_name_and_checks_it_first():
    reg = Registry("widget")
    checked = []

    @reg.register_family("lib", check=checked.append)
    def make(name, **kw):
        return name

    assert reg.get("lib:big")() == "big" and checked == ["big"]
    assert "lib:big" in reg and "lib:" not in reg
    assert reg.names() == ["lib:<name>"]
    with pytest.raises(UsageError, match="name the model after 'lib:'"):
        reg.get("lib:")
