"""Routing maps: the PNG is read back, its stage panels found, and cell colours checked."""

from __future__ import annotations

import copy
import functools

import numpy as np
import PIL.Image
import pytest

from conftest import sample_inputs, tiny
from reroute_export import viz
from reroute_export.errors import UserError
from reroute_export.plan import make_plan
from reroute_export.preprocess import load_image, samples
from reroute_export.results import stage_table
from reroute_export.trace import run_trace

# chelsea.jpg is 336x224: LLaVA's centre crop is visible; astronaut.jpg is square.
SAMPLE_FOR = {"llava": 1, "qwen2.5-vl": 0}


@functools.lru_cache(maxsize=None)
def traced(family: str, method: str = "reroute"):
    loaded = tiny(family)
    index = SAMPLE_FOR[family]
    plan = make_plan(loaded.spec, method, budget=None if method == "none" else 32)
    return run_trace(loaded, plan, sample_inputs(family, index), max_new_tokens=1), index


def draw(family: str, path, method: str = "reroute"):
    result, index = traced(family, method)
    image = load_image(samples()[index][0])
    grid_thw = sample_inputs(family, index).image_grid_thw
    viz.map_for(image, result, family, path, image_grid_thw=grid_thw)
    return result, image


def rgb(im: PIL.Image.Image, xy) -> tuple[int, int, int]:
    return tuple(im.getpixel((int(xy[0]), int(xy[1])))[:3])


def cell_xy(panel: dict, cell: int, token: int, grid_w: int, where: str = "edge") -> tuple[int, int]:
    """A pixel of visual token `token`'s cell: on its frame's left edge, or its centre."""
    r, c = divmod(token, grid_w)
    x0, y0 = panel["box"][0] + c * cell, panel["box"][1] + r * cell
    return (x0, y0 + cell // 2) if where == "edge" else (x0 + cell // 2, y0 + cell // 2)


def frame_runs(im: PIL.Image.Image, y: int) -> list[tuple[int, int]]:
    """Horizontal runs of the panel-frame colour along row y: one per panel."""
    row = [rgb(im, (x, y)) == viz.FRAME for x in range(im.width)]
    runs, start = [], None
    for x, on in enumerate([*row, False]):
        if on and start is None:
            start = x
        elif not on and start is not None:
            if x - start > 20:  # a frame's top edge, not a letter or a swatch outline
                runs.append((start, x))
            start = None
    return runs


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
def test_routing_map_has_one_panel_per_stage_with_legend_colours(family, tmp_path) -> None:
    path = tmp_path / "routing.png"
    result, image = draw(family, path)
    im = PIL.Image.open(path).convert("RGB")
    meta = viz.read_map_metadata(path)
    stages = result.plan.stages
    assert len(stages) == 4 and meta["grid"] == [8, 8]

    # the panels: the original image, then one per decision stage, left to right
    panels = meta["panels"]
    assert [p["kind"] for p in panels] == ["image"] + ["stage"] * len(stages)
    assert [p["layer"] for p in panels[1:]] == [s.layer for s in stages]
    widths = {p["box"][2] - p["box"][0] for p in panels}
    assert widths == {8 * meta["cell"]}
    gap = panels[1]["box"][0] - panels[0]["box"][2]
    assert all(b["box"][0] - a["box"][2] == gap for a, b in zip(panels, panels[1:]))
    assert im.width == panels[0]["box"][0] + (1 + len(stages)) * (widths.pop() + gap)

    # found from the pixels alone: the frames' top edges, one run per panel
    runs = frame_runs(im, panels[0]["box"][1] - 1)
    assert len(runs) == 1 + len(stages)
    assert [r[0] + 1 for r in runs] == [p["box"][0] for p in panels]

    # titles and counts agree with trace's stage table
    for p, row in zip(panels[1:], stage_table(result)):
        assert (p[viz.ACTIVE] + p[viz.REENTERED], p[viz.DEFERRED], p[viz.REENTERED]) == \
               (row["kept"], row["deferred"], row["re-entered"])
        assert p["title"] == f"layer {row['layer']}: {row['kept']} kept, {row['deferred']} deferred, " \
                             f"{row['re-entered']} re-entered"

    # a known token of each state is drawn in its legend colour
    maps = viz.stage_maps(result)
    legend = {name: rgb(im, xy) for name, xy in meta["legend"].items()}
    for state in viz.STATES:
        assert legend[state] == viz.COLORS[state]
        k = next(i for i, m in enumerate(maps) if state in m.states)
        token = maps[k].states.index(state)
        assert rgb(im, cell_xy(panels[1 + k], meta["cell"], token, 8)) == legend[state], (state, k, token)
    # re-entered really means: deferred at an earlier stage, kept now
    k = next(i for i, m in enumerate(maps) if viz.REENTERED in m.states)
    token = maps[k].states.index(viz.REENTERED)
    assert token in maps[k].kept and any(token not in m.kept for m in maps[:k])

    # a deferred cell is dimmed: darker than the same cell where it is active
    m0 = maps[0]
    token = next(i for i in range(64)
                 if m0.states[i] == viz.DEFERRED and any(m.states[i] != viz.DEFERRED for m in maps))
    k = next(j for j, m in enumerate(maps) if m.states[token] != viz.DEFERRED)
    def interior(panel):  # noqa: E306
        x, y = cell_xy(panel, meta["cell"], token, 8, "centre")
        return np.asarray(im.crop((x - 3, y - 3, x + 3, y + 3)), dtype=float).mean()
    assert interior(panels[1]) < interior(panels[1 + k])

    if family == "llava":  # the CLIP centre crop of a 336x224 photo is outlined on the original
        assert meta["fit"] == "crop" and viz.model_view(image, (8, 8), "crop")[1] == (56, 0, 280, 224)
        assert panels[0]["title"] == "original image (blue: the patch grid's crop)"
        assert rgb(im, meta["legend"]["crop"]) == viz.COLORS["crop"]
    else:
        assert meta["fit"] == "resize" and "crop" not in meta["legend"]


def test_delete_method_says_deleted_and_none_has_no_stages(tmp_path) -> None:
    result, _ = draw("llava", tmp_path / "pdrop.png", method="pdrop")
    meta = viz.read_map_metadata(tmp_path / "pdrop.png")
    stages = [p for p in meta["panels"] if p["kind"] == "stage"]
    assert len(stages) == len(result.plan.stages) and all("deleted" in p["title"] for p in stages)
    assert all(p[viz.REENTERED] == 0 for p in stages)  # deleted tokens never come back

    draw("llava", tmp_path / "none.png", method="none")
    meta = viz.read_map_metadata(tmp_path / "none.png")
    assert [p["kind"] for p in meta["panels"]] == ["image"] and meta["stages"] == 0


def test_grid_for() -> None:
    assert viz.grid_for("llava", 576) == (24, 24)
    assert viz.grid_for("llava", 64) == (8, 8)
    assert viz.grid_for("qwen2.5-vl", 576, np.array([[1, 48, 48]])) == (24, 24)
    assert viz.grid_for("qwen2.5-vl", 112, [[1, 16, 28]]) == (8, 14)
    assert viz.grid_for("qwen2.5-vl", 64) == (8, 8)  # no grid given: a square count is a square image
    with pytest.raises(UserError, match="image_grid_thw"):
        viz.grid_for("qwen2.5-vl", 112)
    with pytest.raises(UserError, match="gives 8x14 = 112"):
        viz.grid_for("qwen2.5-vl", 64, [[1, 16, 28]])
    with pytest.raises(UserError, match="square"):
        viz.grid_for("llava", 577)


def test_qwen_token_order_is_row_major_on_the_merged_grid() -> None:
    """Light up one 28x28 block of a 112x196 image: the processor's merged token holding it
    is the one grid_for places there (row-major on the h/2 x w/2 merged grid)."""
    proc = tiny("qwen2.5-vl").preprocessor.image_processor
    pixels = np.zeros((112, 196, 3), dtype=np.uint8)
    row, col = 1, 5  # merged cell: y 28..56, x 140..168
    pixels[28 * row:28 * (row + 1), 28 * col:28 * (col + 1)] = 255
    out = proc(images=PIL.Image.fromarray(pixels), return_tensors="pt")
    thw = out["image_grid_thw"]
    assert thw.tolist() == [[1, 8, 14]]
    grid = viz.grid_for("qwen2.5-vl", 28, thw)
    assert grid == (4, 7)
    per_token = out["pixel_values"].reshape(28, 4, -1).mean(dim=(1, 2))  # 2x2 patches per merged token
    assert divmod(int(per_token.argmax()), grid[1]) == (row, col)


def test_side_by_side_marks_differing_patches(tmp_path) -> None:
    ref, index = traced("qwen2.5-vl")
    image = load_image(samples()[index][0])
    got = copy.deepcopy(ref)
    layer = str(ref.plan.stages[1].layer)
    dropped, added = got.decisions[layer][0], next(i for i in range(64) if i not in ref.decisions[layer])
    got.decisions[layer] = sorted([*got.decisions[layer][1:], added])

    assert viz.maps_differ_markdown(ref, copy.deepcopy(ref), image, (8, 8), tmp_path / "same.png") == ""
    assert not (tmp_path / "same.png").exists()

    md = viz.maps_differ_markdown(ref, got, image, (8, 8), tmp_path / "maps.png")
    assert f"| {layer} | 39 | 39 | 1 | 1 |" in md and "![routing maps, reference vs artifact](maps.png)" in md
    im = PIL.Image.open(tmp_path / "maps.png").convert("RGB")
    meta = viz.read_map_metadata(tmp_path / "maps.png")
    assert meta["rows"] == ["reference", "artifact"]
    stage = [p for p in meta["panels"] if p["kind"] == "stage" and p["layer"] == int(layer)]
    assert [p["row"] for p in stage] == [0, 1]
    assert stage[0]["box"][1] < stage[1]["box"][1] and stage[0]["box"][0] == stage[1]["box"][0]
    magenta = viz.COLORS["differs"]
    for p in stage:
        assert p["differs"] == sorted([dropped, added])
        for token in (dropped, added):
            assert rgb(im, cell_xy(p, meta["cell"], token, 8, "centre")) == magenta
        same = next(i for i in ref.decisions[layer] if i != dropped)
        assert rgb(im, cell_xy(p, meta["cell"], same, 8, "centre")) != magenta
    # other stages selected the same tokens: nothing marked there
    assert all(not p["differs"] for p in meta["panels"] if p["kind"] == "stage" and p["layer"] != int(layer))
    # the frame of the dropped token shows each row's own state
    assert rgb(im, cell_xy(stage[0], meta["cell"], dropped, 8)) != viz.COLORS[viz.DEFERRED]
    assert rgb(im, cell_xy(stage[1], meta["cell"], dropped, 8)) == viz.COLORS[viz.DEFERRED]


def test_map_is_written_whole_or_not_at_all(tmp_path) -> None:
    result, index = traced("llava")
    image = load_image(samples()[index][0])
    path = tmp_path / "maps" / "routing.png"
    viz.routing_map(image, result, (8, 8), path, fit="crop")
    viz.routing_map(image, result, (8, 8), path, fit="crop", title="again")  # replaced in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["routing.png"]
    with pytest.raises(UserError, match="16 cells but the trace has 64"):
        viz.routing_map(image, result, (4, 4), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"cannot write .*routing\.png: .* is a file, not a folder"):
        viz.routing_map(image, result, (8, 8), blocker / "routing.png")
