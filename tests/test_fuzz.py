"""Generated malformed input finds only clear errors: no other exception, no hang, no file
left half-written (hypothesis)."""

import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from course_lib import data, hostfile

FIELDS = ["instruction", "context", "response", "category", "messages", "text", "prompt",
          "completion", "role", "content"]
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS), inner,
                                                                max_size=4),
    max_leaves=8)
rows = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), values, max_size=5).map(json.dumps),
    st.text(max_size=40),  # anything, JSON or not
    st.sampled_from(["", "{", "[]", "null", '{"instruction": "a"}', "\x00", "\ud7ff"]),
)
FUZZ = settings(max_examples=150, deadline=2000,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(lines=st.lists(rows, min_size=0, max_size=8), skip=st.booleans())
def test_malformed_jsonl_only_raises_data_error(tmp_path, lines, skip):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "train.jsonl").write_text("previous\n")
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    try:
        data.prepare(raw, out, skip_invalid=skip, valid_fraction=0.2)
    except data.DataError as e:
        assert str(raw) in str(e)  # names the file (and the line, for a row)
        assert (out / "train.jsonl").read_text() == "previous\n"  # nothing half-written
    except ValueError as e:  # too few valid rows for the split: a clear message too
        assert "rows" in str(e)
        assert (out / "train.jsonl").read_text() == "previous\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


host_chars = string.ascii_letters + string.digits + ".-_=#: \t!/"


def _valid_or_clear_error(parse, text):
    """``parse(text)``'s hosts, or None when it raised the clear HostfileError; any other
    exception fails the test."""
    try:
        hosts = parse(text, "h")
    except hostfile.HostfileError as e:
        assert str(e).startswith("h")  # names the file
        return None
    assert hosts and all(h.slots >= 1 for h in hosts)
    return hosts


@FUZZ
@given(text=st.text(alphabet=host_chars + "\n", max_size=80))
def test_malformed_openmpi_hostfile_only_raises_hostfile_error(text):
    hosts = _valid_or_clear_error(hostfile.parse_openmpi, text)
    if hosts:
        assert len({h.name for h in hosts}) == len(hosts)


@FUZZ
@given(text=st.one_of(st.text(max_size=60), values.map(json.dumps)))
def test_malformed_json_hostfile_only_raises_hostfile_error(text):
    _valid_or_clear_error(hostfile.parse_mlx_json, text)
