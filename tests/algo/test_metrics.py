"""LossMetrics: exact (sum, count) reduction across shards through one flat tensor."""
import pytest
import torch

from megatron_skpo.algo.metrics import LossMetrics


def shard_metrics(values: torch.Tensor, loss_share: float) -> LossMetrics:
    m = LossMetrics()
    m.add("clip_frac", (values > 0.5).sum(), values.numel())
    m.add("ratio", values.sum(), values.numel())
    m.add_total("loss", loss_share)
    return m


def test_reducing_shards_equals_whole_batch_mean():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(23, generator=g, dtype=torch.float64)
    shards = [values[:3], values[3:15], values[15:]]  # uneven shards: a mean of means would be wrong
    per_rank = [shard_metrics(s, 0.1 * (i + 1)) for i, s in enumerate(shards)]
    flats = [m.to_tensor() for m in per_rank]

    def fake_all_reduce(_local: torch.Tensor) -> torch.Tensor:  # what dist.all_reduce(SUM) returns
        return torch.stack(flats).sum(0)

    reduced = per_rank[0].all_reduce(fake_all_reduce).means()
    assert reduced["ratio"] == pytest.approx(values.mean().item(), abs=1e-15)
    assert reduced["clip_frac"] == pytest.approx((values > 0.5).double().mean().item())
    assert reduced["loss"] == pytest.approx(0.6)  # totals are summed, not averaged
    merged = LossMetrics()
    for m in per_rank:
        merged.merge(m)
    assert merged.means() == pytest.approx(reduced)


def test_layout_is_sorted_and_round_trips():
    m = LossMetrics()
    m.add("b", 3.0, 2)
    m.add("a", torch.tensor(1.0), torch.tensor(4))
    m.add("b", 1.0, 2)
    assert m.names() == ["a", "b"]
    assert m.to_tensor().tolist() == [1.0, 4.0, 4.0, 4.0]
    back = m.from_tensor(m.to_tensor() * 2)
    assert back.means() == {"a": 0.25, "b": 1.0}
    with pytest.raises(ValueError, match="expected shape"):
        m.from_tensor(torch.zeros(3))


def test_zero_count_left_out_and_prefix():
    m = LossMetrics()
    m.add("empty", 0.0, 0)
    m.add_total("loss", 0.0)
    assert m.means() == {"loss": 0.0}
    p = m.prefixed("up/")
    assert p.names() == ["up/empty", "up/loss"] and p.totals == {"up/loss"}
    assert LossMetrics().to_tensor().shape == (0,)


def test_kind_conflicts_and_non_scalars_are_errors():
    m = LossMetrics()
    m.add("x", 1.0, 1)
    m.add_total("t", 1.0)
    with pytest.raises(ValueError, match="is a mean"):
        m.add_total("x", 1.0)
    with pytest.raises(ValueError, match="is a total"):
        m.add("t", 1.0, 1)
    with pytest.raises(ValueError, match="scalar"):
        m.add("y", torch.ones(2), 1)
