"""A newcomer follows `make train-zero3` to the strategy table in at most five files, each naming the next."""

from __future__ import annotations

import re

from conftest import ROOT

# (file, what in it names the next file)
CHAIN = [
    ("Makefile", r"train-zero3:.*\n\s+launch/accelerate\.sh zero3"),
    ("launch/accelerate.sh", r"accelerate_configs/STRATEGY\.yaml .*-m dist_dpo train"),
    ("accelerate_configs/zero3.yaml", r"deepspeed_config_file: ds_configs/zero3\.json"),
    ("launch/accelerate.sh", r"`-m dist_dpo train` is dist_dpo/train\.py"),
    ("dist_dpo/train.py", r"strat = strategy_for\(rt\.strategy\)"),
    ("dist_dpo/strategies.py", r"STRATEGY_TABLE: dict\[str, Strategy\] = \{"),
]


def test_make_train_zero3_reaches_the_strategy_table_in_five_files():
    files = []
    for path, names_next in CHAIN:
        text = (ROOT / path).read_text()
        assert re.search(names_next, text), f"{path} no longer says {names_next!r}"
        if path not in files:
            files.append(path)
    assert files[0] == "Makefile" and files[-1] == "dist_dpo/strategies.py"
    hops = len(files) - 1
    assert hops <= 5, files
    # the JSON the yaml names holds the ZeRO stage the runtime reads: the one strategy decision
    assert '"stage": 3' in (ROOT / "ds_configs/zero3.json").read_text()
