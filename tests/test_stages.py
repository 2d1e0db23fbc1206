"""Stage entry points accept what the recipes pass them."""
from __future__ import annotations

import pytest

from common.data import DataError
from common.trainer import read_source_state


def test_a_stage_may_start_from_a_packaged_tag_but_not_a_missing_dir(tmp_path):
    """bi_demo.sh / ship.sh start 03c from the packaged encoder itself (`--checkpoint_dir
    all-MiniLM-L6-v2`): no trainer state, a fresh start. A typo'd directory is an error."""
    assert read_source_state("all-MiniLM-L6-v2") is None
    assert read_source_state(tmp_path) is None  # a plain directory: no trainer state
    with pytest.raises(DataError, match="no such directory"):
        read_source_state(tmp_path / "missing")
