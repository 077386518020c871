"""Built-in tiny model references: 'tiny' and 'tiny:KEY=INT,...'."""

from __future__ import annotations

import pytest

from rayapp.errors import UserError
from rayapp.models.io import resolve_model
from rayapp.models.tiny import TinySpec, parse_tiny_ref


def test_plain_tiny_is_the_default_spec():
    assert parse_tiny_ref("tiny") == TinySpec()
    assert parse_tiny_ref("tiny:") == TinySpec()


def test_hidden_size_brings_heads_and_intermediate_along():
    spec = parse_tiny_ref("tiny:layers=4,hidden=256")
    assert (spec.num_hidden_layers, spec.hidden_size, spec.num_attention_heads, spec.num_key_value_heads) == (4, 256, 4, 4)
    assert spec.intermediate_size == 704  # 2.75 x hidden, as the default 352 for 128
    assert spec.key() != TinySpec().key()  # a different cache directory


@pytest.mark.parametrize("ref, message", [
    ("tiny:depth=4", "depth=4"),
    ("tiny:layers=four", "not an integer"),
    ("tiny:layers=0", "must be positive"),
    ("tiny:hidden=96", "head size"),
    ("tiny:hidden=256,heads=2", "head size"),
])
def test_bad_tiny_references_say_what_is_wrong(ref, message):
    with pytest.raises(ValueError, match=message):
        parse_tiny_ref(ref)
    with pytest.raises(UserError, match=message):
        resolve_model(ref)
