from pathlib import Path

import pytest

from liverec.platform.config import ConfigError, KafkaConfig, LiverecConfig, load_config


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_without_file_or_env() -> None:
    config = load_config(None, env={})
    assert config == LiverecConfig()
    assert config.kafka.session_timeout_ms <= 6000
    assert config.topics.user_state == "liverec.user-state"


def test_yaml_and_toml_files_are_read(tmp_path: Path) -> None:
    yml = write(tmp_path, "c.yaml", "kafka:\n  bootstrap_servers: a:1\ntopics:\n  partitions: 8\n")
    toml = write(tmp_path, "c.toml", '[kafka]\nbootstrap_servers = "b:2"\n[topics]\npartitions = 3\n')
    assert load_config(yml, env={}).kafka.bootstrap_servers == "a:1"
    assert load_config(yml, env={}).topics.partitions == 8
    assert load_config(toml, env={}).kafka.bootstrap_servers == "b:2"
    assert load_config(toml, env={}).topics.partitions == 3


def test_unknown_key_names_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "kafka:\n  bootstrap_server: a:1\n")
    with pytest.raises(ConfigError, match=r"^kafka\.bootstrap_server: unknown field") as info:
        load_config(path, env={})
    assert info.value.field_path == "kafka.bootstrap_server"


def test_unknown_section_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^kafak: unknown field"):
        load_config(write(tmp_path, "c.yaml", "kafak: {}\n"), env={})


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        ("topics:\n  partitions: four\n", "topics.partitions", "expected int"),
        ("topics:\n  partitions: true\n", "topics.partitions", "expected int"),
        ("kafka:\n  security_protocol: TLS\n", "kafka.security_protocol", "expected one of"),
        ("logging:\n  level: 3\n", "logging.level", "expected one of"),
        ("topics:\n  partitions: 0\n", "topics.partitions", "must be >= 1"),
        ("topics:\n  events: 'bad topic!'\n", "topics.events", "invalid Kafka topic name"),
        ("kafka:\n  heartbeat_interval_ms: 9000\n", "kafka.heartbeat_interval_ms", "below session_timeout_ms"),
        ("kafka: 5\n", "kafka", "expected a table"),
        ("trainer:\n  heap_trim_growth_mb: -1\n", "trainer.heap_trim_growth_mb", "must be >= 0"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, text: str, field: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "c.yaml", text), env={})
    assert info.value.field_path == field
    assert fragment in str(info.value)


def test_environment_overrides_file_and_parses_types(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", '[kafka]\nbootstrap_servers = "file:1"\n')
    env = {
        "LIVEREC_KAFKA__BOOTSTRAP_SERVERS": "env:9",
        "LIVEREC_TOPICS__PARTITIONS": "12",
        "LIVEREC_KAFKA__SASL_MECHANISM": "none",
        "OTHER": "ignored",
    }
    config = load_config(path, env=env)
    assert config.kafka.bootstrap_servers == "env:9"
    assert config.topics.partitions == 12
    assert config.kafka.sasl_mechanism is None


def test_bad_environment_value_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^topics\.partitions: expected int, got 'many'"):
        load_config(None, env={"LIVEREC_TOPICS__PARTITIONS": "many"})
    with pytest.raises(ConfigError, match=r"^kafka\.nope: unknown field"):
        load_config(None, env={"LIVEREC_KAFKA__NOPE": "1"})


def test_sasl_requires_mechanism() -> None:
    with pytest.raises(ConfigError, match="kafka.sasl_mechanism"):
        KafkaConfig(security_protocol="SASL_SSL")


def test_missing_and_unparseable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml", env={})
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(write(tmp_path, "c.toml", "[kafka\n"), env={})
    with pytest.raises(ConfigError, match="unsupported extension"):
        load_config(write(tmp_path, "c.ini", "x=1"), env={})
