import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a tiny BERT backbone built locally from a config."""
    from tests.tiny import build_tiny_bert

    path = str(build_tiny_bert(tmp_path_factory.mktemp("tiny-bert")))
    # a merchant's policy lists the backbones its approved app may load: the packaged one and, in
    # tests, this tiny one (subprocesses inherit it)
    os.environ["FEDBEHAVIOR_MERCHANT_POLICY__BACKBONES"] = json.dumps(["", path])
    return path
