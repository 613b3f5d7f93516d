"""YAML + --set configs become frozen dataclasses; every error names the field."""

from __future__ import annotations

import pytest

from jobs.config import ConfigError, describe, load_config, parse_overrides
from pipelines.filter.pipeline import FilterConfig, Rule
from pipelines.ingest.existing import IngestConfig


def test_yaml_and_overrides(tmp_path) -> None:
    path = tmp_path / "ingest.yaml"
    path.write_text(
        "source:\n  kind: webdataset\n  path: /data/*.tar\noutput_dir: /out\nresources:\n  concurrency: 4\n"
    )
    config = load_config(IngestConfig, path, ["resources.batch_size=2", "validate.min_side_px=64"])
    assert config.source.path == "/data/*.tar" and config.resources.concurrency == 4
    assert config.resources.batch_size == 2 and config.validate.min_side_px == 64


def test_rules_become_rule_objects(tmp_path) -> None:
    path = tmp_path / "filter.yaml"
    path.write_text(
        "scores_dir: s\noutput_dir: o\nrules:\n"
        "  - {field: aesthetic_score, op: '>=', value: 5.0}\n"
        "  - {field: key, op: not in, value: [a, b]}\n"
    )
    config = load_config(FilterConfig, path)
    assert config.rules == (
        Rule(field="aesthetic_score", op=">=", value=5.0),
        Rule(field="key", op="not in", value=["a", "b"]),
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["source.kind=webdataset", "source.path=x"], "missing required config field(s): output_dir"),
        (["output_dir=o", "source.kind=zip", "source.path=x"], "source: kind='zip'"),
        (
            ["output_dir=o", "source.kind=folder", "source.path=x", "source.colour=red"],
            "unknown config field(s) source.colour",
        ),
        (
            ["output_dir=o", "source.kind=folder", "source.path=x", "resources.concurrency=0"],
            "resources: concurrency=0",
        ),
        (["oops"], "expected KEY=VALUE"),
    ],
)
def test_errors_name_the_field(overrides, message) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(IngestConfig, None, overrides)
    assert message in str(err.value)


def test_rule_errors_name_the_rule_index() -> None:
    with pytest.raises(ConfigError, match=r"rules\[1\]: op='~'"):
        load_config(
            FilterConfig,
            None,
            [
                "scores_dir=s",
                "output_dir=o",
                "rules=[{field: a, op: '>', value: 1}, {field: b, op: '~', value: 1}]",
            ],
        )


def test_unsafe_yaml_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("output_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception, match="could not determine a constructor"):
        load_config(IngestConfig, path)


def test_describe_lists_defaults() -> None:
    lines = describe(IngestConfig)
    assert "source.kind (str) = (required)" in lines and "validate.min_side_px (int) = 8" in lines
    assert parse_overrides(["a.b=[1, 2]"]) == [("a.b", [1, 2])]
