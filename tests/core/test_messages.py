"""core/messages.py: the one way messages shorten a long list."""

from __future__ import annotations

from vera_lightning.core.messages import shorten


def test_shorten_shows_the_first_entries_and_the_count():
    names = [f"layer{i}" for i in range(7)]
    assert shorten(names, 4) == "layer0, layer1, layer2, layer3, ... (7 in all)"
    assert shorten(names[:4], 4) == "layer0, layer1, layer2, layer3"
    assert shorten([], 4) == ""
    assert shorten(names, 2, as_list=True) == "['layer0', 'layer1'] ... (7 in all)"
    assert shorten(names[:2], 2, as_list=True) == "['layer0', 'layer1']"
    assert shorten(names, 2, sep="\n  ", noun="problems") == "layer0\n  layer1\n  ... (7 problems in all)"
    assert shorten(iter(names), 6) == shorten(names, 6)
