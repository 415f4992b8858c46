from paramserver.cli import build_parser


def test_defaults_do_something_useful() -> None:
    args = build_parser().parse_args(["demo"])
    assert (args.clients, args.rounds, args.model) == (3, 5, "mlp")
    serve = build_parser().parse_args(["serve"])
    assert (serve.host, serve.clients) == ("127.0.0.1", 2)
    client = build_parser().parse_args(["client", "client1"])
    assert (client.name, client.server, client.lr, client.batch_size) == (
        "client1", "127.0.0.1:50051", 0.1, 32)
