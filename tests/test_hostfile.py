"""Hostfiles in both forms: parsing, validation with file:line errors, conversion."""

import json

import pytest

from course_lib import hostfile as hf
from conftest import REPO


def test_course_hostfiles_parse_and_agree():
    openmpi = hf.read_hostfile(REPO / "hostfile")
    mlx = hf.read_hostfile(REPO / "hostfile.json")
    assert [(h.name, h.slots) for h in openmpi] == [(h.name, h.slots) for h in mlx]
    assert json.loads(hf.to_mlx_json(openmpi)) == json.loads((REPO / "hostfile.json").read_text())


def test_slots_comments_and_round_trip():
    hosts = hf.parse_openmpi("# lab\n10.0.0.1 slots=2  # two ranks\n\nnode-b max_slots=4\n")
    assert [(h.name, h.slots, h.line) for h in hosts] == [("10.0.0.1", 2, 2), ("node-b", 1, 4)]
    assert hf.total_slots(hosts) == 3
    assert hf.to_openmpi(hosts) == "10.0.0.1 slots=2\nnode-b slots=1\n"
    with pytest.raises(hf.HostfileError, match="no IP address for node-b"):
        hf.to_mlx_json(hosts)
    again = hf.parse_mlx_json(hf.to_mlx_json(hosts[:1]))
    assert [(h.name, h.slots, h.ips) for h in again] == [("10.0.0.1", 2, ["10.0.0.1"])]


@pytest.mark.parametrize("text,message", [
    ("a slots=0\n", "f:1: slots='0' must be a whole number >= 1"),
    ("a slots=two\n", "f:1: slots='two' must be a whole number >= 1"),
    ("a slots=-1\n", "f:1: slots='-1' must be a whole number >= 1"),
    ("a\n# c\na slots=2\n", "f:3: host a is listed twice (first on line 1)"),
    ("a cores=2\n", "f:1: unknown option 'cores=2'"),
    ("a slots=4 max_slots=2\n", "f:1: slots=4 exceeds max_slots=2"),
    ("bad_host!\n", "f:1: 'bad_host!' is not a host name or address"),
    ("# only comments\n\n", "f: no hosts"),
])
def test_bad_openmpi_hostfiles(text, message):
    with pytest.raises(hf.HostfileError) as err:
        hf.parse_openmpi(text, "f")
    assert message in str(err.value)


@pytest.mark.parametrize("text,message", [
    ('[{"ssh": "a"},', "f:1: not valid JSON"),
    ("[]", "expected a non-empty list of hosts"),
    ('[{"ips": ["10.0.0.1"]}]', 'hosts[0]: expected {"ssh"'),
    ('[{"ssh": "a", "ips": ["not-an-ip"]}]', "'ips' must be a list of IP addresses"),
])
def test_bad_mlx_hostfiles(text, message):
    with pytest.raises(hf.HostfileError) as err:
        hf.parse_mlx_json(text, "f")
    assert message in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(hf.HostfileError, match="no such hostfile"):
        hf.read_hostfile(tmp_path / "absent")
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(hf.HostfileError, match="the hostfile is empty"):
        hf.read_hostfile(tmp_path / "empty")
