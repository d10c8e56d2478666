"""The FLOPs formula against torch's FlopCounterMode on the model itself, one objective at a time
(the counter sees every matmul; `reference` attention keeps its matmuls visible)."""
import pytest
import torch
from test_model import make_batch, small_config
from torch.utils.flop_counter import FlopCounterMode

from vlp.models import LossWeights, UnifiedModel
from vlp.models.flops import flops_per_sample, rerank_flops

B, T = 4, 12
CONFIG = small_config(attention_backend="reference", fusion_layers=2, depth=3)


def counted(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as count:
        fn()
    return count.get_total_flops()


def edited(batch: dict) -> dict:
    return {**batch, "neg_ids": batch["text_ids"].flip(0), "neg_mask": batch["text_mask"].flip(0),
            "has_neg": torch.tensor([True, False, True, True])}


@pytest.mark.parametrize("weights", [
    LossWeights(itc=1, itm=0, mlm=0), LossWeights(itc=0, itm=1, mlm=0),
    LossWeights(itc=0, itm=0, mlm=1), LossWeights(itc=0, itm=0, mlm=0, lm=1),
    LossWeights(itc=1, itm=1, mlm=0, lm=1),
], ids=["itc", "itm", "mlm", "lm", "itc+itm+lm"])
@pytest.mark.parametrize("with_edits", [False, True], ids=["", "edited"])
def test_each_objective_is_counted_exactly(weights, with_edits):
    torch.manual_seed(0)
    model = UnifiedModel(CONFIG, weights)
    batch = make_batch(CONFIG, B=B, T=T)
    batch = edited(batch) if with_edits else batch
    estimate = flops_per_sample(CONFIG, text_len=T, global_batch=B, local_batch=B,
                                weights=weights, edited_negatives=with_edits, backward=False)
    assert counted(lambda: model(**batch)) == pytest.approx(B * estimate, rel=1e-12)
    assert flops_per_sample(CONFIG, text_len=T, global_batch=B, local_batch=B, weights=weights,
                            edited_negatives=with_edits) == 3 * estimate


def test_vqa_is_counted_with_its_answer_head():
    torch.manual_seed(0)
    weights = LossWeights(itc=0, itm=0, mlm=0)
    model = UnifiedModel(CONFIG, weights)
    model.attach_vqa_head(7)
    batch = make_batch(CONFIG, B=B, T=T)
    targets = torch.rand(B, 7)
    estimate = flops_per_sample(CONFIG, text_len=T, weights=weights, num_answers=7,
                                backward=False)
    assert counted(lambda: model(**batch, vqa_targets=targets)) == pytest.approx(
        B * estimate, rel=1e-12)
    # without answers or without its weight, VQA costs nothing: the two towers' bottom blocks
    towers = counted(lambda: (model.image_states(batch["images"]),
                              model.text_states(batch["text_ids"], batch["text_mask"])))
    for unused in (LossWeights(itc=0, itm=0, mlm=0, vqa=0), weights):
        assert B * flops_per_sample(CONFIG, text_len=T, weights=unused, backward=False,
                                    num_answers=7 if unused.vqa == 0 else 0) == towers


def test_the_text_length_defaults_to_the_padded_maximum():
    assert flops_per_sample(CONFIG) == flops_per_sample(CONFIG, text_len=CONFIG.max_text_len)


def test_the_batches_default_to_one_sample():
    """ITC's logit columns grow with the global batch, the edits' with the local one."""
    one = flops_per_sample(CONFIG, global_batch=1, local_batch=1, edited_negatives=True)
    assert flops_per_sample(CONFIG, edited_negatives=True) == one
    assert flops_per_sample(CONFIG, global_batch=2, edited_negatives=True) > one
    assert flops_per_sample(CONFIG, local_batch=2, edited_negatives=True) > one


def test_reranking_is_counted_exactly():
    """3 images and 5 captions encoded once, 6 (caption, image) pairs fused and scored."""
    torch.manual_seed(0)
    model = UnifiedModel(CONFIG).eval()
    batch = make_batch(CONFIG, B=5, T=T)
    images, ids, mask = batch["images"][:3], batch["text_ids"], batch["text_mask"]
    pairs_text, pairs_image = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([0, 0, 1, 1, 2, 2])

    def rerank():
        memory = model.image_memory(model.image_states(images))
        states = model.text_states(ids, mask)
        model.itm_scores(memory.select(pairs_image), states[pairs_text], mask[pairs_text])

    assert counted(rerank) == pytest.approx(
        rerank_flops(CONFIG, pairs=6, images=3, texts=5, text_len=T), rel=1e-12)
    assert rerank_flops(CONFIG, pairs=6, images=3, texts=5) == rerank_flops(
        CONFIG, pairs=6, images=3, texts=5, text_len=CONFIG.max_text_len)


def test_itc_columns_count_the_global_batch_and_edited_columns_the_local_one(monkeypatch):
    """A stub gather that hands back twice the local batch, as two ranks would."""
    from vlp.models import losses

    monkeypatch.setattr(losses, "gather_with_grad", lambda x: (torch.cat([x, x.flip(0)]), 0))
    weights = LossWeights(itc=1, itm=0, mlm=0)
    torch.manual_seed(0)
    model = UnifiedModel(CONFIG, weights)
    batch = edited(make_batch(CONFIG, B=B, T=T))
    estimate = flops_per_sample(CONFIG, text_len=T, global_batch=2 * B, local_batch=B,
                                weights=weights, edited_negatives=True, backward=False)
    assert counted(lambda: model(**batch)) == pytest.approx(B * estimate, rel=1e-12)
