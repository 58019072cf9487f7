"""Stop-string matching and incremental detokenization."""

import pytest

from service.engines.text import StopMatcher


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[str, str | None]:
    out = ""
    for piece in pieces:
        text, matched = matcher.feed(piece)
        out += text
        if matched is not None:
            return out, matched
    return out + matcher.flush(), None


def test_no_stops_passes_text_through():
    assert feed_all(StopMatcher(()), ["Hello", " world"]) == ("Hello world", None)


def test_stop_split_across_pieces_is_never_emitted():
    matcher = StopMatcher(("END",))
    emitted = []
    for piece in ["abc E", "N", "D tail"]:
        text, matched = matcher.feed(piece)
        emitted.append(text)
        if matched:
            break
    assert emitted == ["abc ", "", ""] and matched == "END"


def test_held_text_is_released_when_it_cannot_match():
    matcher = StopMatcher(("END",))
    assert matcher.feed("xE") == ("x", None)
    assert matcher.feed("Nx") == ("ENx", None)


def test_earliest_stop_wins():
    assert feed_all(StopMatcher(("b", "a")), ["xxab"]) == ("xx", "a")


def test_flush_returns_held_text_at_the_end():
    assert feed_all(StopMatcher(("STOP",)), ["go ST"]) == ("go ST", None)


@pytest.mark.parametrize("stop", ["。", "\n\n", "🎉"])
def test_multibyte_and_whitespace_stops(stop):
    assert feed_all(StopMatcher((stop,)), ["前", stop, "后"]) == ("前", stop)
