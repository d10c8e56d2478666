"""Greedy and beam search on a stub language model whose next-token probabilities are a table:
the right caption is known by hand."""
import pytest
import torch

from vlp.models.decoding import DecodingConfig, _ban_repeated_ngrams, _beam_search, _greedy

EOS, A, B = 1, 2, 3  # token 0 is BOS (never generated: probability 0)


def probs(eos: float, a: float, b: float) -> list[float]:
    return [0.0, eos, a, b]


class TableLM:
    """_LanguageModel's interface; tables[image] maps the caption so far to the next token's
    probabilities, key None for any other caption."""

    def __init__(self, tables):
        self.tables = tables
        self.image = torch.arange(len(tables))  # image of each row
        self.tokens = torch.zeros(len(tables), 1, dtype=torch.long)  # BOS
        self.advances = 0  # model calls after the first

    def _log_probs(self) -> torch.Tensor:
        return torch.tensor([self.tables[i].get(tuple(row[1:].tolist()), self.tables[i][None])
                             for i, row in zip(self.image.tolist(), self.tokens)]).log()

    def start(self) -> torch.Tensor:
        return self._log_probs()

    def advance(self, token_ids: torch.Tensor) -> torch.Tensor:
        self.advances += 1
        self.tokens = torch.cat([self.tokens, token_ids[:, None]], dim=1)
        return self._log_probs()

    def select(self, rows: torch.Tensor) -> None:
        self.tokens, self.image = self.tokens[rows], self.image[rows]


# Greedy takes A (0.5), A (0.45), then ends: "A A" has probability 0.135. "B" then the end
# token has 0.36: the best caption, which a beam of 2 keeps.
LOOKAHEAD = {(): probs(0.1, 0.5, 0.4), (A,): probs(0.2, 0.45, 0.35), (B,): probs(0.9, 0.06, 0.04),
             (A, A): probs(0.6, 0.25, 0.15), None: probs(0.5, 0.3, 0.2)}
ENDS_AT_ONCE = {(): probs(0.7, 0.2, 0.1), None: probs(0.5, 0.3, 0.2)}
NEVER_ENDS = {None: probs(0.04, 0.9, 0.06)}


def test_greedy_takes_the_likeliest_token_per_step_and_drops_the_end_token():
    lm = TableLM([LOOKAHEAD, ENDS_AT_ONCE, NEVER_ENDS])
    assert _greedy(lm, EOS, 4, 0) == [[A, A], [], [A, A, A, A]]
    assert lm.advances == 3  # no model call after the last token
    lm = TableLM([LOOKAHEAD, ENDS_AT_ONCE, NEVER_ENDS])
    assert _beam_search(lm, EOS, 4, beam(1)) == [[A, A], [], [A, A, A, A]]  # a beam of one


@pytest.mark.parametrize("max_length, expected", [(1, [A]), (2, [A, A]), (3, [A, A])])
def test_max_length_counts_the_end_token(max_length, expected):
    assert _greedy(TableLM([LOOKAHEAD]), EOS, max_length, 0) == [expected]


def test_greedy_without_repeated_bigrams():
    """Always A (0.9), else B (0.06): "A A" may occur once, "A B" once, then only the end."""
    assert _greedy(TableLM([NEVER_ENDS]), EOS, 8, 2) == [[A, A, B, A]]


def beam(k: int, max_length: int = 5, length_penalty: float = 1.0) -> DecodingConfig:
    return DecodingConfig(max_length=max_length, beam_size=k, length_penalty=length_penalty)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_a_beam_of_two_finds_the_caption_greedy_misses(length_penalty):
    lm = TableLM([LOOKAHEAD, ENDS_AT_ONCE, NEVER_ENDS])
    config = beam(2, length_penalty=length_penalty)
    assert _beam_search(lm, EOS, 4, config) == [[B], [], [A, A, A, A]]
    lm = TableLM([LOOKAHEAD])  # after "A A end" and "A B end" no beam can win: two steps
    assert _beam_search(lm, EOS, 6, config) == [[B]] and lm.advances == 2


def test_the_search_stops_when_no_beam_at_its_current_length_beats_the_worst_finished():
    """HF's rule (early_stopping=False). After 2 steps "end" (-0.69 per token) and "A end"
    (log 0.27 / 2 = -0.65) are finished; "B B" (log 0.198 = -1.62) scores -0.81 at length 2 and
    cannot beat them, so the search stops, though "B B end" would score -0.54 at length 3."""
    table = {(): probs(0.5, 0.3, 0.2), (A,): probs(0.9, 0.05, 0.05),
             (B,): probs(0.005, 0.005, 0.99), (B, B): probs(0.99, 0.005, 0.005),
             None: probs(0.5, 0.25, 0.25)}
    assert _beam_search(TableLM([table]), EOS, 6, beam(2)) == [[A]]


def test_beams_still_going_at_max_length_finish_as_they_are():
    """At max_length 2: "B end" (0.36) and "A A" (0.225, cut) finish; at 1: "A" (0.5)."""
    assert _beam_search(TableLM([LOOKAHEAD]), EOS, 2, beam(2)) == [[B]]
    assert _beam_search(TableLM([LOOKAHEAD]), EOS, 1, beam(2)) == [[A]]


# "A end": 0.6 * 0.5 = 0.3 in 2 tokens; "B B B end": 0.35 * 0.96^2 * 0.4 = 0.129 in 4.
# log 0.3 = -1.20 beats log 0.129 = -2.05 as a sum, loses per token (-0.60 < -0.51), and
# would win again with lengths one too long (-0.40 > -0.41).
LONG_OR_SHORT = {(): probs(0.05, 0.6, 0.35), (A,): probs(0.5, 0.3, 0.2),
                 (B,): probs(0.02, 0.02, 0.96), (B, B): probs(0.02, 0.02, 0.96),
                 (B, B, B): probs(0.4, 0.3, 0.3), None: probs(0.5, 0.25, 0.25)}


@pytest.mark.parametrize("length_penalty, expected", [(0.0, [A]), (1.0, [B, B, B])])
def test_the_length_penalty_divides_the_score_by_the_length_with_the_end_token(
        length_penalty, expected):
    lm = TableLM([LONG_OR_SHORT])
    assert _beam_search(lm, EOS, 6, beam(3, length_penalty=length_penalty)) == [expected]


def test_beam_search_without_repeated_bigrams():
    captions = _beam_search(TableLM([NEVER_ENDS, LOOKAHEAD]), EOS, 8,
                            DecodingConfig(max_length=8, beam_size=2, no_repeat_ngram_size=2))
    for caption in captions:
        bigrams = list(zip([0] + caption, caption))  # BOS first
        assert len(bigrams) == len(set(bigrams))
    assert captions == [[A, A, B, A], [B]]


def test_beam_search_when_fewer_tokens_are_possible_than_beams():
    """A caption can only be "A" then the end token; an image whose every token has probability
    0 gets no caption."""
    only_a = {(): probs(0.0, 1.0, 0.0), None: probs(1.0, 0.0, 0.0)}
    impossible = {None: probs(0.0, 0.0, 0.0)}
    assert _beam_search(TableLM([only_a, impossible]), EOS, 4, beam(3)) == [[A], []]
    end_only = {None: [0.0, 1.0]}  # a vocabulary of BOS and the end token: k * 2 candidates
    assert _beam_search(TableLM([end_only]), EOS, 4, beam(2)) == [[]]


def test_an_end_token_ranked_below_the_beam_does_not_finish_a_caption():
    """HF's rule: of the 2k candidates, only an end token among the first k finishes a caption.
    Beams of two; step 2 ranks "A end" (0.30), "A A" (0.15), "B end" (0.144), "B A": the third
    is not a caption. Had it been taken, two would be finished and the search would stop at step
    3, where the best beam "A A A" (log 0.054 / 3 = -0.973) cannot beat "B end" (-0.969); it goes
    on instead to "A A A A A" (cut at 5 tokens: log 0.0519 / 5 = -0.592), which beats "A end"
    (log 0.3 / 2 = -0.602)."""
    table = {(): probs(0.1, 0.5, 0.4), (A,): probs(0.6, 0.3, 0.1), (B,): probs(0.36, 0.34, 0.30),
             (A, A): probs(0.30, 0.36, 0.34), (A, A, A): probs(0.01, 0.98, 0.01),
             (A, A, A, A): probs(0.01, 0.98, 0.01), None: probs(0.34, 0.335, 0.325)}
    assert _beam_search(TableLM([table]), EOS, 5, beam(2)) == [[A, A, A, A, A]]


def test_a_prefix_as_long_as_the_n_gram_already_bans_its_repeat():
    log_probs = torch.zeros(2, 6)
    _ban_repeated_ngrams(log_probs, torch.tensor([[5, 5], [4, 5]]), 2)
    assert log_probs.isinf().nonzero().tolist() == [[0, 5]]  # "5 5" again; "4 5" cannot recur
    _ban_repeated_ngrams(log_probs, torch.tensor([[3]]), 2)  # shorter than the n-gram: nothing


@pytest.mark.parametrize("settings, message", [
    ({"max_length": 0}, "max_length must be >= 1, got 0"),
    ({"beam_size": 0}, "beam_size must be >= 1, got 0"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be >= 0, got -1")])
def test_decoding_settings_at_their_bounds(settings, message):
    DecodingConfig(max_length=1, beam_size=1, no_repeat_ngram_size=0)
    with pytest.raises(ValueError) as error:
        DecodingConfig(**settings)
    assert str(error.value) == message
