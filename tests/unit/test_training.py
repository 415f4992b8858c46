import torch

from paramserver import codec, training


def test_default_model_is_mlp_784_128_10() -> None:
    specs = codec.spec_of(training.build_model("mlp", 0).state_dict())
    assert [(s.name, s.shape) for s in specs] == [
        ("0.weight", (128, 784)), ("0.bias", (128,)), ("2.weight", (10, 128)), ("2.bias", (10,))]


def test_same_seed_same_model_and_data() -> None:
    a = training.build_model("cnn", 3).state_dict()
    b = training.build_model("cnn", 3).state_dict()
    assert codec.state_dict_digest(a) == codec.state_dict_digest(b)
    assert "2.num_batches_tracked" in a
    x1, y1 = training.make_dataset(0, "c1", 50)
    x2, y2 = training.make_dataset(0, "c1", 50)
    assert torch.equal(x1, x2)
    assert torch.equal(y1, y2)
    assert not torch.equal(x1, training.make_dataset(0, "c2", 50)[0])


def test_training_lowers_the_loss() -> None:
    torch.set_num_threads(1)
    config = training.TrainConfig(examples=500, learning_rate=0.1)
    model = training.build_model("mlp", 0)
    data = training.make_dataset(0, "c1", 500)
    before = training.evaluate(model, data)["loss"]
    for round in range(1, 4):
        training.train(model, data, config, round, "c1")
    assert training.evaluate(model, data)["loss"] < before
