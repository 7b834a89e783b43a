from edged.engine.detok import IncrementalDecoder
from edged.engine.stops import StopMatcher


def feed_all(m, pieces):
    out, hit = "", False
    for p in pieces:
        o, hit = m.feed(p)
        out += o
        if hit:
            break
    if not hit:
        out += m.flush()
    return out, hit


def test_stop_string_split_across_tokens_is_not_emitted():
    out, hit = feed_all(StopMatcher(["</answer>"]), ["Paris", " is nice</", "ans", "wer> more"])
    assert hit and out == "Paris is nice"


def test_partial_match_is_released_when_it_turns_out_not_to_be_a_stop():
    m = StopMatcher(["STOP"])
    o1, _ = m.feed("go ST")
    assert o1 == "go "  # "ST" held back
    o2, hit = m.feed("ILL here")
    assert not hit and o1 + o2 + m.flush() == "go STILL here"


def test_earliest_of_several_stops_wins():
    out, hit = feed_all(StopMatcher(["\n\n", "User:"]), ["a User: b\n\nc"])
    assert hit and out == "a "


def test_no_stops_passes_through():
    assert feed_all(StopMatcher([]), ["a", "b"]) == ("ab", False)


def test_incremental_detok_keeps_multibyte_chars_and_spaces(tiny_engine):
    tok = tiny_engine.tokenizer
    text = "Grüße aus München! 東京は日本の首都です。 Emoji: 🙂🚀 and spaces  here"
    ids = tok.encode(text, add_special_tokens=False).ids
    # the byte-level tokenizer really splits some characters across tokens
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    d = IncrementalDecoder(tok)
    deltas = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in x for x in deltas)
