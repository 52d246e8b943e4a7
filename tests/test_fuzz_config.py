"""Fuzzed overrides: any key and any value give a clean ConfigError or a valid config, never a
traceback of another kind."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pirl import config
from pirl.errors import ConfigError
from pirl.schema import Config

pytestmark = pytest.mark.slow
BASE = "config=pretrain/pirl/pirl_demo_resnet18"


def all_keys(cls=Config, prefix="config") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}.{f.name}")
        else:
            keys.append(f"{prefix}.{f.name}")
    return keys


KEYS = all_keys()
scalar = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "true",
            "false",
            "null",
            "''",
            "abc",
            "[]",
            "[1,2]",
            "{}",
            "[[mlp,{dims:[1]}]]",
            "-1",
            "0",
            "1e400",
        ]
    ),
    st.text(alphabet="abcdefgxyz_0123456789.-", min_size=0, max_size=12),
)
key = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS).map(lambda k: k + "x"),
    st.text(alphabet="abcXYZ_.", min_size=1, max_size=20).map(lambda k: "config." + k),
)


def check(overrides: list[str]) -> None:
    try:
        cfg, derived = config.load([BASE, *overrides], world_size=None)
        config.fit_dataset(cfg, derived, 5000)
    except ConfigError as exc:
        assert str(exc).strip(), "an empty error message"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(key, scalar), min_size=1, max_size=3))
def test_random_overrides_never_crash(pairs):
    check([f"{k}={v}" for k, v in pairs])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(min_size=1, max_size=30))
def test_random_override_strings_never_crash(text):
    check([text])
