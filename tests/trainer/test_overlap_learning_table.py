"""scripts/overlap_learning_table.py: the README's one-step-off table, by hand-worked numbers."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "overlap_learning_table.py"
spec = importlib.util.spec_from_file_location("overlap_learning_table", SCRIPT)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)


def test_table_rows_and_mean_difference():
    run = lambda start, final: {"start": start, "final": final}  # noqa: E731
    results = {"skpo": {"0": {"sync": run(0.3, 0.40), "async": run(0.3, 0.42)},
                        "1": {"sync": run(0.2, 0.30), "async": run(0.2, 0.30)},
                        "2": {"async": run(0.25, 0.5)}},
               "grpo": {"0": {"sync": run(0.3, 0.5)}}}
    text = mod.table(results)
    lines = text.splitlines()
    assert lines[2] == "| GRPO | 0 | 30.0 | 50.0 | not run | - |"  # GRPO first, then the rest by name
    assert lines[3:6] == ["| SKPO | 0 | 30.0 | 40.0 | 42.0 | +2.0 |", "| SKPO | 1 | 20.0 | 30.0 | 30.0 | +0.0 |",
                          "| SKPO | 2 | 25.0 | not run | 50.0 | - |"]
    # differences +2 and 0: mean +1.0, standard error stdev(2, 0) / sqrt(2) = 1.0
    assert "SKPO: mean difference +1.0 points (standard error 1.0, 2 seeds)" in text
