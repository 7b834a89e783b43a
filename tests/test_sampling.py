import numpy as np
import pytest

from edged.engine.request import Options
from edged.engine.sampling import Sampler


def logits_of(probs):
    return np.log(np.asarray(probs, dtype=np.float32))


def test_greedy_picks_argmax_without_copying_rules():
    s = Sampler(Options(temperature=0, repeat_penalty=1.0))
    assert s(logits_of([0.1, 0.6, 0.3]), history=[]) == 1


def test_same_seed_same_draws_different_seed_differs():
    lg = logits_of(np.full(50, 1 / 50))
    opts = Options(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0, seed=1234)
    s1, s2 = Sampler(opts), Sampler(opts)
    seq1 = [s1(lg, []) for _ in range(40)]
    seq2 = [s2(lg, []) for _ in range(40)]
    assert seq1 == seq2
    s3 = Sampler(Options(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0, seed=99))
    assert [s3(lg, []) for _ in range(40)] != seq1


def test_temperature_one_matches_the_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    s = Sampler(Options(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=7))
    n = 20000
    counts = np.bincount([s(logits_of(probs), []) for _ in range(n)], minlength=4) / n
    assert np.allclose(counts, probs, atol=0.015)


def test_low_temperature_sharpens():
    probs = np.array([0.4, 0.35, 0.25])
    s = Sampler(Options(temperature=0.2, top_k=0, top_p=1.0, repeat_penalty=1.0, seed=3))
    counts = np.bincount([s(logits_of(probs), []) for _ in range(4000)], minlength=3) / 4000
    assert counts[0] > 0.6


def test_top_k_top_p_min_p_cut_the_tail():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    lg = logits_of(probs)
    s = Sampler(Options(temperature=1, top_k=2, top_p=1.0, repeat_penalty=1.0, seed=1))
    assert {s(lg, []) for _ in range(2000)} == {0, 1}
    # nucleus 0.75: 0.5 + 0.3 reaches it, the rest is cut
    s = Sampler(Options(temperature=1, top_k=0, top_p=0.75, repeat_penalty=1.0, seed=2))
    assert {s(lg, []) for _ in range(2000)} == {0, 1}
    # min_p 0.5: keep tokens with p >= 0.25 -> 0 and 1
    s = Sampler(Options(temperature=1, top_k=0, top_p=1.0, min_p=0.5, repeat_penalty=1.0, seed=3))
    assert {s(lg, []) for _ in range(2000)} == {0, 1}


def test_repeat_penalty_discourages_recent_tokens():
    lg = np.array([2.0, 1.9, -1.0], dtype=np.float32)
    greedy = Options(temperature=0, repeat_penalty=1.5, repeat_last_n=64)
    assert Sampler(greedy)(lg, history=[0]) == 1  # 2.0/1.5 < 1.9
    assert Sampler(greedy)(lg, history=[2]) == 0
    assert lg[0] == 2.0  # caller's logits untouched


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 1.5}, {"top_k": "3"}, {"seed": 1.5}, {"stop": [1]}, {"num_predict": 0}])
def test_bad_options_name_the_option(bad):
    from edged.errors import RequestError

    with pytest.raises(RequestError) as e:
        Options.from_dict(bad)
    assert next(iter(bad)) in str(e.value)
