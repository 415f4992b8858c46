"""Your own CNN on a non-IID split of the handwritten digits, 10 clients."""
from torch import nn

import paramserver as ps


def cnn() -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def task(ctx: ps.TaskContext) -> ps.Task:
    digits = ps.data.digits()
    if ctx.client is None:  # the server: the model and its test data
        return ps.Task(model=cnn, train_data=digits.train, test_data=digits.test)
    labels = digits.train_labels.tolist()
    parts = ps.partition.dirichlet(labels, ctx.clients, alpha=0.5, seed=ctx.seed)
    mine = ps.data.subset(digits.train, parts[ctx.index])
    return ps.Task(model=cnn, train_data=mine, lr=0.1, epochs=2)


if __name__ == "__main__":
    history = ps.run_experiment(task, clients=10, rounds=15, strategy="fedavg")
    print("test accuracy by round:", [round(a, 3) for a in history.accuracy()])
    print("final model sha256:", history.final_sha256)
