import pytest

from trainer.errors import UserError
from trainer.grid import FLOAT_BITS, Cell, Grid


def test_cell_text_form_round_trips():
    cell = Cell.parse("L4-D128-B1")
    assert (cell.layers, cell.dim, cell.bits) == (4, 128, 1)
    assert str(cell) == "L4-D128-B1"
    assert Cell.parse(str(cell)) == cell
    assert Cell.parse("l6-d384") == Cell(6, 384, FLOAT_BITS)
    assert cell.name2d == "L4-D128"


def test_bytes_per_vector():
    assert Cell(6, 384).bytes_per_vector == 384 * 4
    assert Cell(6, 384, 1).bytes_per_vector == 48
    assert Cell(2, 64, 4).bytes_per_vector == 32


@pytest.mark.parametrize("text", ["L4D128", "L4-D128-B", "X4-D128", "L-1-D3", ""])
def test_malformed_cells_are_refused(text):
    with pytest.raises(UserError, match="is not a cell"):
        Cell.parse(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("L0-D8", "layers must be >= 1"),
        ("L1-D0", "dim must be >= 1"),
        ("L1-D8-B0", "bits must be"),
        ("L1-D8-B20", "bits must be"),
    ],
)
def test_impossible_cells_are_refused(text, message):
    with pytest.raises(UserError, match=message):
        Cell.parse(text)


def test_cell_beyond_the_model_names_the_limit():
    with pytest.raises(UserError, match="keeps 7 layers but the model has 6"):
        Cell(7, 32).check_fits(6, 384)
    with pytest.raises(UserError, match="keeps 512 dims but the model embeds in 384"):
        Cell(2, 512).check_fits(6, 384)


def test_grid_from_product_and_from_cells():
    grid = Grid.from_spec(layers=[2, 4], dims=[32, 64], bits=[4, 1, 32])
    assert [str(c) for c in grid.cells] == ["L2-D32-B32", "L2-D64-B32", "L4-D32-B32", "L4-D64-B32"]
    assert grid.bits == (1, 4, 32) and grid.code_bits == (1, 4)
    assert len(grid.all_cells()) == 12
    assert grid.full_cell == Cell(4, 64)
    listed = Grid.from_spec(cells=["L2-D32", [4, 64]])
    assert listed.cells == (Cell(2, 32), Cell(4, 64))
    assert listed.layers == (2, 4) and listed.dims == (32, 64)


def test_grid_validation_errors():
    with pytest.raises(UserError, match="no cells given"):
        Grid.from_spec(cells=[])
    with pytest.raises(UserError, match="strictly increasing"):
        Grid.from_spec(layers=[2, 4], dims=[64, 32])
    with pytest.raises(UserError, match="duplicate"):
        Grid.from_spec(cells=["L2-D32", "L2-D32"])
    with pytest.raises(UserError, match="either 'cells' or 'layers'"):
        Grid.from_spec(cells=["L2-D32"], layers=[2], dims=[32])
    with pytest.raises(UserError, match="dims"):
        Grid.from_spec(cells=["L2-D64", "L4-D32"]).check_nested()


def test_cells_listed_with_bits_are_used_exactly_as_listed():
    for typed in (["L6-D384-B1", "L2-D64"], ["L6-D384-B1,L2-D64"], "L6-D384-B1, L2-D64", "[L6-D384-B1 L2-D64]"):
        grid = Grid.from_spec(cells=typed, default_bits=[32, 1])
        assert grid.all_cells() == [Cell(6, 384, 1), Cell(2, 64)]
        assert grid.cells == (Cell(6, 384), Cell(2, 64)) and grid.bits == (1, 32)
    assert Grid.from_spec(cells=["L2-D64-B1", "L2-D64-B32"]).all_cells() == [Cell(2, 64, 1), Cell(2, 64)]
    with pytest.raises(UserError, match="name their bits .* cannot also be given"):
        Grid.from_spec(cells=["L6-D384-B1", "L2-D64"], bits=[1])
    with pytest.raises(UserError, match="duplicate"):
        Grid.from_spec(cells="L2-D64-B1,l2-d64-b1")


def test_cells_without_bits_take_every_depth():
    grid = Grid.from_spec(cells="L2-D64,L6-D384", default_bits=[32, 1])
    assert grid.all_cells() == [Cell(2, 64, 1), Cell(2, 64), Cell(6, 384, 1), Cell(6, 384)]
    assert Grid.from_spec(cells=["L2-D64"], bits=[4]).all_cells() == [Cell(2, 64, 4)]
