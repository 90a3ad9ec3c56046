"""Stop strings in streamed text: found across pieces, never partly released."""

import random

import pytest

from tokenloom.engine.output import StopMatcher


def feed_all(stops, pieces, include=False):
    m = StopMatcher(stops, include)
    out, hit = [], False
    for p in pieces:
        text, hit = m.feed(p)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(m.flush())
    return out, hit


def test_stop_split_across_pieces_is_found_and_excluded():
    out, hit = feed_all(["###"], ["Hello #", "#", "# world"])
    assert hit and "".join(out) == "Hello "
    assert all("#" not in o for o in out)


def test_include_stop_string():
    out, hit = feed_all(["END"], ["abc E", "N", "D tail"], include=True)
    assert hit and "".join(out) == "abc END"


def test_prefix_released_once_it_cannot_match():
    m = StopMatcher(["abc"])
    assert m.feed("xab") == ("x", False)
    assert m.feed("d") == ("abd", False)


def test_earliest_of_several_stops_wins():
    out, hit = feed_all(["world", "lo w"], ["hello world"])
    assert hit and "".join(out) == "hel"


@pytest.mark.parametrize("seed", range(20))
def test_random_splits_equal_whole_text(seed):
    rng = random.Random(seed)
    alphabet = "ab c\n"
    text = "".join(rng.choice(alphabet) for _ in range(60))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(2)]
    cuts = sorted(rng.sample(range(1, len(text)), 10))
    pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    out, hit = feed_all(stops, pieces)
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    expected = text[:min(hits)] if hits else text
    assert "".join(out) == expected and hit == bool(hits)
    for k in range(len(out)):  # no released piece may end inside a stop string
        released = "".join(out[:k + 1])
        assert not any(s in released for s in stops)
