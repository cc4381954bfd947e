import pytest

from megatron_skpo.registry import Registry


def test_register_get_and_reject_duplicates():
    reg = Registry("thing")

    @reg.register("a")
    def a():
        return 1

    assert reg.get("a") is a and "a" in reg and reg.names() == ["a"]
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        reg.register("a")(lambda: 2)
    with pytest.raises(KeyError, match="unknown thing 'b'; registered: a"):
        reg.get("b")
