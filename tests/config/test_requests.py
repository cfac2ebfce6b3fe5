"""Removal requests as written in ``unlearning.requests``: every form parses to the request it
reads as, and every malformed one is one ConfigError naming the entry, before any work."""

from __future__ import annotations

import pytest
from conftest import small_config

from fedunlearn.config.requests import Request
from fedunlearn.config.tree import ConfigError


def _requests(toml: str, *extra: str) -> tuple[Request, ...]:
    return small_config(f"unlearning.requests={toml}", *extra).requests


def test_every_form_reads_as_written() -> None:
    got = _requests('[[0], {client = 1, samples = "backdoor"}, {client = 3, samples = [9, 4]},'
                    ' {client = 3, fraction = 0.25, seed = 7}, {client = 2}, {label = 5}]',
                    "backdoor.clients=[1]")
    assert got == (
        Request("client", clients=(0,)),
        Request("samples", clients=(1,), backdoor=True),
        Request("samples", clients=(3,), indices=(4, 9)),
        Request("samples", clients=(3,), fraction=0.25, seed=7),
        Request("client", clients=(2,)),
        Request("class", label=5),
    )
    assert [r.describe() for r in got] == [
        "client 0", "samples of client 1 (backdoor)", "samples of client 3 (2 listed)",
        "samples of client 3 (fraction 0.25)", "client 2", "class 5"]


def test_client_lists_keep_working_unchanged() -> None:
    assert _requests("[[0], [3, 1]]") == (Request("client", clients=(0,)),
                                          Request("client", clients=(1, 3)))


@pytest.mark.parametrize(("toml", "extra", "says"), [
    ("[[0], [0]]", (), "entry 1 asks again for client 0, already removed by request 0"),
    ("[[1], {client = 1, fraction = 0.5}]", (), "entry 1 asks again for client 1"),
    ("[[]]", (), "entry 0 is empty"),
    ("[[0, 0]]", (), "names a client twice"),
    ("[[7]]", (), "entry 0 names client 7, which is not a client; use ids in 0..3"),
    ("[{client = 9, samples = [1]}]", (), "names client 9, which is not a client"),
    ("[[0], [1], [2], [3]]", (), "would remove every client"),
    ('[{client = 0, samples = "backdoor"}]', (), "holds none (backdoor.clients = [])"),
    ("[{client = 0, fraction = 0}]", (), "fraction = 0 must be in (0, 1]"),
    ("[{client = 0, fraction = 1.5}]", (), "fraction = 1.5 must be in (0, 1]"),
    ("[{client = 0, samples = [1], fraction = 0.1}]", (), "not both"),
    ("[{client = 0, samples = [1], seed = 3}]", (), "'seed' goes with 'fraction'"),
    ("[{client = 0, samples = []}]", (), "non-empty list of sample positions"),
    ("[{client = 0, samples = [-1]}]", (), "non-empty list of sample positions"),
    ("[{client = 0, samples = [2, 2]}]", (), "lists sample 2 twice"),
    ('[{client = 0, samples = "all"}]', (), 'must be "backdoor" or a non-empty list'),
    ("[{label = -1}]", (), "must be a class index"),
    ("[{label = 1, client = 0}]", (), "has the key 'label' alone"),
    ("[{lable = 1}]", (), "unknown key lable"),
    ("[{fraction = 0.1}]", (), "no 'client' or 'label'"),
    ("[[0, \"one\"]]", (), "('one' is str, not int)"),
    ("[3]", (), "(3 is int, not list[int] | table)"),
])
def test_a_malformed_request_is_one_line_naming_its_entry(toml: str, extra: tuple[str, ...],
                                                          says: str) -> None:
    with pytest.raises(ConfigError) as err:
        small_config(f"unlearning.requests={toml}", *extra)
    message = str(err.value)
    assert message.startswith("config key 'unlearning.requests'") and "\n" not in message
    assert says in message, message
