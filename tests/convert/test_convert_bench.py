"""``skpo-bench convert`` on a two-layer model with SmolLM2's real per-layer shapes."""
from __future__ import annotations

import json

from megatron_skpo.cli.bench import main as bench


def test_bench_convert_reports_times_throughput_and_rss(capsys):
    assert bench(["convert", "--preset", "smollm2-135m", "--layers", "2", "--tp", "3", "--pp", "2"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # embedding 49152 x 576 + 2 layers x (576 x 960 + 576 x 576 + 3 x 576 x 1536 + 2 x 576) + norm, bf16
    params = 49152 * 576 + 2 * (576 * 960 + 576 * 576 + 3 * 576 * 1536 + 2 * 576) + 576
    assert res["weight_gb"] == round(params * 2 / 1e9, 4) and (res["tp"], res["pp"]) == (3, 2)
    for direction in ("hf_to_mcore", "mcore_to_hf"):
        assert res[direction]["seconds"] > 0 and res[direction]["gb_per_s"] > 0
    assert res["peak_rss_mb"] > 0
