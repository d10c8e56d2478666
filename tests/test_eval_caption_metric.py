"""The caption scorer on hand-computed cases: BLEU and ROUGE-L of a one-word substitution, the
SPICE status in each state of its install, and bad references. METEOR is a stub (the real one
loads its paraphrase tables for half a minute; test_eval_caption.py runs it)."""
import pytest

from vlp.pipeline.eval.caption import metric
from vlp.pipeline.eval.caption.metric import METRICS, CaptionScorer, spice_unavailable


class StubMeteor:
    """METEOR's scorer: 0.5 whatever the captions."""

    def compute_score(self, gts, res):
        return 0.5, [0.5] * len(res)


@pytest.fixture(autouse=True)
def stub_meteor(monkeypatch):
    monkeypatch.setattr(metric, "Meteor", StubMeteor)


def test_every_image_needs_a_reference():
    for references in ({}, {1: ["a red circle"], 2: []}):
        with pytest.raises(ValueError, match="^every image needs at least one reference caption$"):
            CaptionScorer(references)


def test_one_word_of_three_wrong_gives_hand_computed_bleu_and_rouge(capsys):
    """"A red square." against "a red circle": 2 of 3 unigrams and 1 of 2 bigrams match, no
    trigram, at the reference's length (no brevity penalty); the longest common subsequence is 2
    of 3 words both ways. The PTB tokenizer lower-cases and drops the period."""
    with CaptionScorer({5: ["a red circle"]}, spice=False) as scorer:
        assert scorer.spice_status == "not requested"
        metrics = scorer.score({5: "A red square."})
    assert list(metrics) == list(METRICS)
    assert metrics["Bleu_1"] == pytest.approx(2 / 3)
    assert metrics["Bleu_2"] == pytest.approx((2 / 3 * 1 / 2) ** 0.5)
    assert metrics["Bleu_3"] < 1e-4 and metrics["Bleu_4"] < 1e-4
    assert metrics["ROUGE_L"] == pytest.approx(2 / 3)
    assert metrics["METEOR"] == 0.5
    assert capsys.readouterr().out == ""  # BLEU's length ratios are not printed


def test_spice_needs_both_corenlp_jars(tmp_path, monkeypatch):
    monkeypatch.setattr(metric, "SPICE_LIB", tmp_path)
    assert "missing ['stanford-corenlp-3.6.0.jar', 'stanford-corenlp-3.6.0-models.jar']" in (
        spice_unavailable())
    (tmp_path / "stanford-corenlp-3.6.0.jar").touch()
    assert "missing ['stanford-corenlp-3.6.0-models.jar'] in " + str(tmp_path) in (
        spice_unavailable())
    (tmp_path / "stanford-corenlp-3.6.0-models.jar").touch()
    assert spice_unavailable() is None


class StubSpice:
    """SPICE's scorer: 0.25 on the tokenized captions, or the error it is given."""
    error = None
    seen = []

    def compute_score(self, gts, res):
        if self.error:
            raise self.error
        self.seen.append((gts, res))
        return 0.25, []


def test_installed_spice_is_scored_and_its_failure_reported_not_raised(monkeypatch):
    monkeypatch.setattr(metric, "spice_unavailable", lambda: None)
    monkeypatch.setattr(metric.spice_module, "Spice", StubSpice)
    with CaptionScorer({3: ["A red circle."], 1: ["a blue cross"]}) as scorer:
        assert scorer.spice_status == "available"
        metrics = scorer.score({1: "a blue cross", 3: "a red circle"})
        assert list(metrics) == [*METRICS, "SPICE"] and metrics["SPICE"] == 0.25
        assert StubSpice.seen == [({1: ["a blue cross"], 3: ["a red circle"]},
                                   {1: ["a blue cross"], 3: ["a red circle"]})]
        StubSpice.error = OSError("java not found")
        assert list(scorer.score({1: "a cross", 3: "a circle"})) == list(METRICS)
        assert scorer.spice_status == "unavailable: SPICE failed (OSError: java not found)"
    assert scorer.meteor is None  # closed: its Java process ends
    StubSpice.error = None
