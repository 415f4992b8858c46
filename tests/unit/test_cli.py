"""The command line as a new user meets it: defaults, one-line errors with exit
code 2 decided at parse time, --version, --log-level anywhere, help texts."""

import argparse
from pathlib import Path

import pytest
import torch

from paramserver import __version__, training
from paramserver.cli import build_parser, main, parse_args
from paramserver.demo import client_command, prepare_workdir


def test_defaults_do_something_useful() -> None:
    args = parse_args(["demo"])
    assert (args.clients, args.rounds, args.task, args.data) == (10, 20, "mlp", "digits")
    assert args.partition == "dirichlet:0.5"
    serve = parse_args(["serve"])
    assert (serve.host, serve.clients, serve.min_clients, serve.log_level) == (
        "127.0.0.1", 2, 1, "INFO")
    client = parse_args(["client", "client1"])
    assert (client.name, client.server, client.lr, client.batch_size) == (
        "client1", "127.0.0.1:50051", 0.1, 32)


BAD = [
    (["serve", "--clients", "0"], "--clients: must be at least 1, got 0"),
    (["serve", "--rounds", "-2"], "--rounds: must be at least 0, got -2"),
    (["serve", "--clients", "2", "--min-clients", "3"], "--min-clients (3) is more than --clients"),
    (["serve", "--clients", "4", "--capacity", "3"], "--capacity (3) is less than --clients"),
    (["serve", "--port", "70000"], "a port is at most 65535"),
    (["serve", "--round-timeout", "nan"], "--round-timeout: expected a finite number"),
    (["--log-level", "loud", "serve"], "--log-level: expected one of DEBUG"),
    (["client", "c1", "--log-level", "loud"], "--log-level: expected one of DEBUG"),
    (["client", "c1", "--examples", "many"], "--examples: expected an integer, got 'many'"),
    (["client", "c1", "--chunk-size", str(8 << 20)], "--chunk-size is at most"),
    (["demo", "--clients", "-1"], "--clients: must be at least 1"),
    (["serve", "--linger", "inf"], "--linger: expected a finite number"),
    (["serve", "--ready-file", "/no/such/dir/ready"], "no directory /no/such/dir"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_mistake_is_one_line_and_exit_code_2(argv: list[str], message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, f"not one line:\n{err}"
    assert message in err, err
    assert "Traceback" not in err


def test_log_level_is_accepted_before_and_after_the_subcommand() -> None:
    assert parse_args(["--log-level", "debug", "serve"]).log_level == "DEBUG"
    assert parse_args(["serve", "--log-level", "warning"]).log_level == "WARNING"
    assert parse_args(["--log-level", "debug", "client", "c", "--log-level", "error"]
                      ).log_level == "ERROR"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"paramserver {__version__}"


def subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    choice: argparse.ArgumentParser = actions[0].choices[name]
    return choice


@pytest.mark.parametrize("command", ["serve", "client", "demo"])
def test_every_help_shows_the_defaults(command: str) -> None:
    text = " ".join(subparser(command).format_help().split())
    for action in subparser(command)._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in text, (command, action.dest)


def test_help_documents_the_server_address_and_the_deadline() -> None:
    client_help = " ".join(subparser("client").format_help().split())
    assert "host:port, or unix:PATH" in client_help
    assert "--connect-timeout" in client_help
    serve_help = " ".join(subparser("serve").format_help().split())
    assert "once its first update has arrived" in serve_help
    assert "fastest" in serve_help


def test_the_demo_passes_every_client_option_on(tmp_path: Path) -> None:
    args = parse_args(["demo", "--streaming", "--round-wait", "7", "--connect-timeout", "9",
                       "--lr", "0.5"])
    command = client_command(args, tmp_path, 0, 1234, ["--task", "mlp"])
    assert "--streaming" in command
    for flag, value in (("--round-wait", "7.0"), ("--connect-timeout", "9.0"), ("--lr", "0.5")):
        assert command[command.index(flag) + 1] == value, flag


def test_the_big_model_trains_on_data_of_its_own_shape() -> None:
    torch.set_num_threads(1)
    model = training.build_model("big", 0)
    data = training.make_dataset(0, "c1", 4, "big")
    assert data[0].shape == (4, 5000)
    config = training.TrainConfig(model="big", examples=4, batch_size=4)
    loss = training.train(model, data, config, 1, "c1")
    assert loss > 0


def test_the_demo_never_empties_a_directory_it_did_not_make(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--workdir", str(tmp_path)]) == 2
    assert "holds files the demo did not make" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_demo_empties_its_own_workdir(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    prepare_workdir(workdir)
    (workdir / "server.log").write_text("old run")
    prepare_workdir(workdir)
    assert sorted(p.name for p in workdir.iterdir()) == [".paramserver-demo"]
