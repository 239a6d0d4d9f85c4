"""The server's flags from POWERSERVE_* environment variables (server/__main__.py), as a container
or a Kubernetes manifest would set them; the command line wins over them. (Every test server of
the suite takes its API key and --enforce-eager this way: tests/conftest.py.)"""

import pytest

from server.__main__ import parse_args

pytestmark = pytest.mark.fast  # needs no engine: `make test-fast`


def test_every_kind_of_flag_comes_from_its_variable():
    args = parse_args([], {
        "POWERSERVE_PORT": "9001",  # a value
        "POWERSERVE_API_KEY": "secret",
        "POWERSERVE_REQUEST_TIMEOUT": "30",
        "POWERSERVE_ENFORCE_EAGER": "true",  # a switch
        "POWERSERVE_ENABLE_PREFIX_CACHING": "off",  # a switch with a --no- form
        "POWERSERVE_MAX_CONCURRENT": "power_mcmc=8 power_smc=2",  # a repeatable flag
        "POWERSERVE_SERVED_MODEL_NAME": "first second",  # a flag of several values
        "POWERSERVE_SEED": "-1",  # a value that looks like a flag
        "PORT": "1",  # not ours
    })
    assert args.port == 9001 and args.api_key == "secret" and args.request_timeout == 30
    assert args.enforce_eager is True and args.enable_prefix_caching is False
    assert args.max_concurrent == ["power_mcmc=8", "power_smc=2"]
    assert args.served_model_name == ["first", "second"]
    assert args.seed == -1


def test_the_command_line_wins():
    environ = {"POWERSERVE_PORT": "9001", "POWERSERVE_MAX_CONCURRENT": "power_mcmc=8 power_smc=2",
               "POWERSERVE_ENFORCE_EAGER": "false"}
    args = parse_args(["--port=9002", "--max-concurrent", "power_smc=3", "--enforce-eager"], environ)
    assert args.port == 9002 and args.max_concurrent == ["power_smc=3"] and args.enforce_eager is True
    assert parse_args([], environ).enforce_eager is False


def test_the_drain_lasts_as_long_as_the_longest_request_unless_told():
    assert parse_args(["--max-request-timeout", "90"], {}).drain_timeout == 90
    assert parse_args(["--max-request-timeout", "90", "--drain-timeout", "0"], {}).drain_timeout == 0


@pytest.mark.parametrize("environ, message", [
    ({"POWERSERVE_MAX_MODEL_LENGTH": "2048"}, "POWERSERVE_MAX_MODEL_LENGTH names no flag (--max-model-length)"),
    ({"POWERSERVE_ENFORCE_EAGER": "maybe"}, "--enforce-eager is a switch, so its value must be one of 1, true"),
    ({"POWERSERVE_PORT": "eighty"}, "argument --port: invalid int value: 'eighty'"),
    ({"POWERSERVE_DISTILLED": "a='/b"}, "POWERSERVE_DISTILLED=\"a='/b\": No closing quotation"),
    ({"POWERSERVE_REQUEST_TIMEOUT": "0"}, "--request-timeout must be positive"),
    ({"POWERSERVE_DRAIN_TIMEOUT": "-1"}, "--drain-timeout must not be negative"),
])
def test_a_bad_variable_is_a_one_line_error(environ, message, capsys):
    with pytest.raises(SystemExit) as exit:
        parse_args([], environ)
    assert exit.value.code == 2 and message in capsys.readouterr().err
