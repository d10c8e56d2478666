"""The official COCO caption evaluation (pycocoevalcap), as `COCOEvalCap.evaluate` runs it.

Captions and references are tokenized by the Stanford PTB tokenizer (Java), then scored with
BLEU-1..4, METEOR (Java), ROUGE-L and CIDEr-D, plus SPICE when its Stanford CoreNLP models are
installed (pycocoevalcap downloads them on first use, which is impossible offline: then SPICE is
reported unavailable, never a crash). Metric names and values are pycocoevalcap's: fractions,
CIDEr on its own scale (papers print them x100). CIDEr's document frequencies come from the
references of the images scored, as in the official code.

One scorer tokenizes the references once and keeps one METEOR process for several prediction
sets (the model and its baselines).
"""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import spice as spice_module
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
SPICE_LIB = Path(spice_module.__file__).parent / "lib"
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def spice_unavailable() -> str | None:
    """Why SPICE cannot run here, or None when its models are installed."""
    missing = [name for name in SPICE_JARS if not (SPICE_LIB / name).is_file()]
    if missing:
        return (f"Stanford CoreNLP 3.6.0 is not installed for SPICE (missing {missing} in "
                f"{SPICE_LIB}; pycocoevalcap's get_stanford_models downloads them)")
    return None


class CaptionScorer:
    """COCO caption metrics of prediction sets against fixed references {image_id: [captions]}."""

    def __init__(self, references: dict[int, list[str]], spice: bool = True):
        if not references or any(not refs for refs in references.values()):
            raise ValueError("every image needs at least one reference caption")
        self.ids = sorted(references)
        self.references = _ptb_tokenize({i: references[i] for i in self.ids})
        self.meteor: Meteor | None = Meteor()
        self.spice_status = "not requested" if not spice else (
            f"unavailable: {spice_unavailable()}" if spice_unavailable() else "available")

    def score(self, predictions: dict[int, str]) -> dict[str, float]:
        """Every metric of one caption per image (all images of the references, no others)."""
        if sorted(predictions) != self.ids:
            raise ValueError(f"predictions cover {len(predictions)} images, the references "
                             f"{len(self.ids)}: score the same images")
        res = _ptb_tokenize({i: [predictions[i]] for i in self.ids})
        gts = self.references
        metrics = {}
        with contextlib.redirect_stdout(io.StringIO()):  # BLEU prints its length ratios
            bleu, _ = Bleu(4).compute_score(gts, res)
        metrics.update(zip(METRICS[:4], bleu))
        metrics["METEOR"], _ = self.meteor.compute_score(gts, res)
        metrics["ROUGE_L"], _ = Rouge().compute_score(gts, res)
        metrics["CIDEr"], _ = Cider().compute_score(gts, res)
        if self.spice_status == "available":
            metrics.update(self._spice(gts, res))
        return {name: float(value) for name, value in metrics.items()}

    def _spice(self, gts, res) -> dict[str, float]:
        try:
            value, _ = spice_module.Spice().compute_score(gts, res)
            return {"SPICE": value}
        except (OSError, subprocess.SubprocessError, ValueError, KeyError,
                json.JSONDecodeError) as exc:
            self.spice_status = f"unavailable: SPICE failed ({type(exc).__name__}: {exc})"
            return {}

    def close(self) -> None:
        self.meteor = None  # its __del__ ends the Java process

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ptb_tokenize(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    """PTB-tokenized, lower-cased captions without punctuation, as the official code scores."""
    return PTBTokenizer().tokenize({i: [{"caption": c} for c in caps]
                                    for i, caps in captions.items()})
