import json

import pytest
import torch

# pytest's default import mode ("prepend") puts this directory (tests/, no
# __init__.py) on sys.path, so the tests import their helpers as `helpers.*`.

# The reference runs tiny models: one thread is faster, and makes its float32
# reductions (and so its recorded generations) the same from run to run.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory):
    """A random reference checkpoint with the toy tokenizer, chat template and generation config."""
    from helpers.reference import build_reference, save_reference

    from helpers.tiny_tokenizer import write_tokenizer

    path = save_reference(build_reference(seed=3), tmp_path_factory.mktemp("chat"))
    write_tokenizer(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4], "pad_token_id": 0}))
    return path


@pytest.fixture(scope="session")
def wide_checkpoint(tmp_path_factory):
    """Like chat_checkpoint, with a sliding window of 64: a whole test run fits
    in it, so mlx-lm can trim every layer's cache."""
    from helpers.reference import build_reference, save_reference

    from helpers.tiny_tokenizer import write_tokenizer

    path = save_reference(build_reference(seed=4, sliding_window=64), tmp_path_factory.mktemp("wide"))
    write_tokenizer(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1], "pad_token_id": 0}))
    return path
