import pytest
import torch

from kakeyaturbo.errors import ConfigError, ShapeError
from kakeyaturbo.ops import lloyd_max

SEED_TABLES = {
    1: [-0.798156, 0.798156],
    2: [-1.5100, -0.4528, 0.4528, 1.5100],
    3: [-2.151945, -1.343757, -0.756268, -0.244943, 0.244943, 0.756268, 1.343757, 2.151945],
}
KNOWN_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_gaussian_tables_match_seed(bits):
    assert torch.allclose(lloyd_max.gaussian_table(bits), torch.tensor(SEED_TABLES[bits]), atol=2e-3)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gaussian_mse_on_large_sample(bits):
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(bits))
    table = lloyd_max.gaussian_table(bits)
    mse = float(((lloyd_max.dequantize(lloyd_max.quantize(z, table), table) - z) ** 2).mean())
    assert mse == pytest.approx(KNOWN_MSE[bits], rel=0.02)
    assert lloyd_max.gaussian_mse(bits) == pytest.approx(KNOWN_MSE[bits], rel=2e-3)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_fit_recovers_gaussian_table(bits):
    z = torch.randn(400_000, generator=torch.Generator().manual_seed(10 + bits))
    fitted = lloyd_max.fit(z, bits)
    assert torch.allclose(fitted, lloyd_max.gaussian_table(bits), atol=0.03)
    assert bool((fitted[1:] > fitted[:-1]).all())


def test_ties_go_to_lower_index():
    table = torch.tensor([-1.0, 1.0])
    assert lloyd_max.quantize(torch.tensor([0.0]), table).tolist() == [0]


def test_errors():
    with pytest.raises(ConfigError, match="bits"):
        lloyd_max.gaussian_table(9)
    with pytest.raises(ShapeError, match="at least 4 samples"):
        lloyd_max.fit(torch.zeros(3), 2)


def test_fit_batch_groups_stop_on_their_own():
    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(2, 4000, generator=g, dtype=torch.float64)
    heavy = torch.randn(2, 4000, generator=g, dtype=torch.float64) ** 3  # converges far more slowly
    samples, member = torch.cat([gaussian, heavy]), torch.rand(4, 4000, generator=g) < 0.8
    start = torch.linspace(-1.5, 1.5, 8, dtype=torch.float64).repeat(4, 1)

    def fit(rows: slice, groups: int = 1) -> torch.Tensor:
        return lloyd_max.fit_batch(samples[rows], member[rows], start[rows], max_iter=100, tol=1e-2, groups=groups)

    alone = torch.cat([fit(slice(0, 2)), fit(slice(2, 4))])
    assert torch.equal(fit(slice(0, 4), groups=2), alone)  # each run exactly as if fitted alone
    assert not torch.equal(fit(slice(0, 4)), alone)  # as one run, the Gaussian rows would keep moving
    with pytest.raises(ShapeError, match="groups must be a positive divisor of the 4 rows"):
        fit(slice(0, 4), groups=3)
