import app.warmup  # noqa: F401


def test_warm():
    pass
