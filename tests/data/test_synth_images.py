"""Tests for imgpipe.data.synth_images: breeds, class looks, image sizes, rendering and off_centre placement."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from imgpipe.data.synth_images import (
    CAT_BREEDS,
    DOG_BREEDS,
    OXFORD_BREEDS,
    choose_breeds,
    class_style,
    image_rng,
    render_image,
    sample_elongated_size,
    sample_size,
)

# --- breeds and looks -----------------------------------------------------------


def assert_box_on_the_object(img, box, c, n):
    """The head box is in frame and mostly covers pixels of the class hue, far above the image's share."""
    x0, y0, x1, y1 = box
    assert 1 <= x0 < x1 <= img.width and 1 <= y0 < y1 <= img.height
    hsv = np.asarray(img.convert("HSV"), dtype=np.float32) / 255
    dh = np.abs(hsv[..., 0] - class_style(c).hue)
    on_hue = (np.minimum(dh, 1 - dh) < 0.06) & (hsv[..., 1] > 0.45)
    inside = on_hue[y0 - 1 : y1, x0 - 1 : x1].mean()
    assert inside >= 0.1, (c, n, inside)
    assert inside >= 2 * on_hue.mean(), (c, n, inside, on_hue.mean())


def test_breed_list_matches_the_real_release() -> None:
    assert len(OXFORD_BREEDS) == 37 and len(set(OXFORD_BREEDS)) == 37
    assert len(CAT_BREEDS) == 12 and all(b[0].isupper() for b in CAT_BREEDS)
    assert len(DOG_BREEDS) == 25 and all(b == b.lower() for b in DOG_BREEDS)
    # Class ids of the real list.txt: 1 Abyssinian, 2 american_bulldog, ..., 37 yorkshire_terrier.
    assert OXFORD_BREEDS[:3] == ("Abyssinian", "american_bulldog", "american_pit_bull_terrier")
    assert OXFORD_BREEDS[5] == "Bengal" and OXFORD_BREEDS[-1] == "yorkshire_terrier"


@pytest.mark.parametrize("n", [1, 2, 4, 12, 37])
def test_choose_breeds_mixes_cats_and_dogs(n: int) -> None:
    chosen = choose_breeds(n)
    assert len(chosen) == len(set(chosen)) == n
    assert chosen == sorted(chosen, key=str.lower)
    assert set(chosen) <= set(OXFORD_BREEDS)
    cats = sum(b in CAT_BREEDS for b in chosen)
    if n >= 2:
        assert 0 < cats < n  # both naming conventions appear
    if n <= 2 * len(CAT_BREEDS):
        assert abs(cats - (n - cats)) <= 1
    assert chosen == choose_breeds(n)


def test_class_styles_are_distinct() -> None:
    styles = [class_style(i) for i in range(37)]
    assert len({(s.shape, s.texture) for s in styles}) == 37
    with pytest.raises(ValueError, match="class_index"):
        class_style(37)


def test_sample_size_bounds_and_shape_mix() -> None:
    sizes = [sample_size(np.random.default_rng(i)) for i in range(300)]
    assert all(200 <= s <= 800 for wh in sizes for s in wh)
    landscape = sum(w > h for w, h in sizes)
    assert 0.5 * len(sizes) < landscape < 0.9 * len(sizes)  # both orientations, mostly landscape
    assert Counter(sizes).most_common(1)[0][0] == (500, 375)  # the real set's typical size
    tight = [sample_size(np.random.default_rng(i), 100, 300) for i in range(100)]
    assert all(100 <= s <= 300 for wh in tight for s in wh)


def test_render_image_is_deterministic_and_sized() -> None:
    a, box_a = render_image(3, np.random.default_rng(7), (320, 240))
    b, box_b = render_image(3, np.random.default_rng(7), (320, 240))
    c, _ = render_image(3, np.random.default_rng(8), (320, 240))
    assert a.mode == "RGB" and a.size == (320, 240)
    assert a.tobytes() == b.tobytes() and box_a == box_b
    assert a.tobytes() != c.tobytes()
    with pytest.raises(ValueError, match="at least 32x32"):
        render_image(0, np.random.default_rng(0), (20, 100))


def test_head_box_sits_on_the_object() -> None:
    # The object is the only strongly saturated thing of the class hue, so the head
    # box (top of the object) must be rich in such pixels, much more than the image.
    for c in range(12):
        for n in range(1, 4):
            rng = image_rng(0, c, n)
            img, (x0, y0, x1, y1) = render_image(c, rng, sample_size(rng))
            assert_box_on_the_object(img, (x0, y0, x1, y1), c, n)


# --- off_centre -------------------------------------------------------------------


def test_sample_elongated_size_is_wide_or_tall() -> None:
    sizes = [sample_elongated_size(np.random.default_rng(i)) for i in range(400)]
    assert all(200 <= s <= 800 for wh in sizes for s in wh)
    aspects = [max(w, h) / min(w, h) for w, h in sizes]
    assert min(aspects) >= 1.59 and max(aspects) <= 2.21
    assert 0.35 < np.mean([w > h for w, h in sizes]) < 0.65, "both orientations, about evenly"
    # Bounds that leave no room for the ratio still hold.
    assert all(100 <= s <= 120 for i in range(50) for s in sample_elongated_size(np.random.default_rng(i), 100, 120))


def test_off_centre_objects_stay_in_frame_with_a_correct_head_box() -> None:
    for c in range(12):
        for n in range(1, 6):
            rng = image_rng(0, c, n)
            img, (x0, y0, x1, y1) = render_image(c, rng, sample_elongated_size(rng), off_centre=True)
            assert_box_on_the_object(img, (x0, y0, x1, y1), c, n)


def test_off_centre_end_band_placement_keeps_the_object_in_frame() -> None:
    from imgpipe.data.synth_images import _end_band_position

    outside, tries = 0, 2000
    for i in range(tries):
        rng = np.random.default_rng(i)
        width, height = sample_elongated_size(rng)
        side = int(min(width, height) * rng.uniform(0.25, 0.45) * 1.415)  # up to the largest rotated object
        w, h = (side, int(side * 0.9)) if i % 2 else (int(side * 0.9), side)
        x, y = _end_band_position(rng, (width, height), (w, h))
        assert 0 <= x <= width - w and 0 <= y <= height - h, (width, height, w, h, x, y)
        # Where the object's centre sits along the long axis, against the central square.
        length, across, centre = (width, height, x + w / 2) if width >= height else (height, width, y + h / 2)
        outside += not (length - across) / 2 <= centre <= (length + across) / 2
    # Half go to an end band (centred there, or as far out as they fit); some of the rest land outside too.
    assert 0.5 <= outside / tries <= 0.8, outside / tries
