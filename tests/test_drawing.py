"""The one box-drawing helper, fc.draw_boxes, puts boxes on pixel edges (notebook 01's convention)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import frcnn_common as fc  # noqa: E402


def test_a_one_pixel_box_frames_exactly_that_pixel():
    """Box (2, 3, 3, 4) is the pixel in column 2, row 3; imshow centres it on (2, 3), so its
    edges are at x 1.5..2.5 and y 2.5..3.5."""
    image = torch.zeros(3, 6, 8)
    fig, ax = plt.subplots()
    fc.draw_boxes(ax, image, torch.tensor([[2.0, 3.0, 3.0, 4.0], [0.0, 0.0, 8.0, 6.0]]), ["a"],
                  color=["red", "blue"], linestyle=["-", "--"])
    rects = [p for p in ax.patches if isinstance(p, matplotlib.patches.Rectangle)]
    assert [(r.get_x(), r.get_y(), r.get_width(), r.get_height()) for r in rects] == [
        (1.5, 2.5, 1.0, 1.0), (-0.5, -0.5, 8.0, 6.0)]   # the second: the whole image, edge to edge
    assert ax.images[0].get_extent() == [-0.5, 7.5, 5.5, -0.5]  # imshow's default extent
    assert len(ax.texts) == 1 and ax.texts[0].get_text() == "a"
    assert rects[1].get_linestyle() == "--"
    assert all(r.get_path_effects() for r in rects)   # the halo is on by default
    plt.close(fig)


def test_boxes_over_an_axis_that_already_shows_the_image():
    fig, ax = plt.subplots()
    ax.imshow(torch.zeros(4, 4).numpy())
    fc.draw_boxes(ax, None, torch.tensor([[1.0, 1.0, 3.0, 2.0]]), color="lime", outline=False)
    (rect,) = ax.patches
    assert (rect.get_x(), rect.get_y(), rect.get_width(), rect.get_height()) == (0.5, 0.5, 2.0, 1.0)
    assert len(ax.images) == 1 and not rect.get_path_effects()
    plt.close(fig)


def test_the_halo_makes_a_lime_box_visible_on_lime():
    """A lime box on a lime image: without the halo the rendered pixels equal the background's;
    with it, pixels along the box's edge turn dark."""
    import numpy as np
    lime = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 40, 40)
    dark = {}
    for outline in (False, True):
        fig, ax = plt.subplots(figsize=(2, 2), dpi=50)
        fc.draw_boxes(ax, lime, torch.tensor([[10.0, 10.0, 30.0, 30.0]]), color="lime", outline=outline)
        fig.canvas.draw()
        rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
        dark[outline] = int((rgb.sum(-1) < 200).sum())
        plt.close(fig)
    assert dark[False] == 0 and dark[True] > 20
