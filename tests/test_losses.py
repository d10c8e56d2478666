"""ITC across ranks, hard-negative sampling for ITM, and the VQA loss."""
import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather

from vlp.pipeline.distributed import free_port
from vlp.models import LossWeights, UnifiedModel, load_config
from vlp.models.losses import (contrastive_loss, gumbel_argmax, hard_negatives, set_gather,
                               token_cross_entropy, vqa_loss)
from vlp.models.model import EditedCaptions

WORLD, LOCAL_B, T = 2, 3, 8


def test_hard_negatives_are_never_the_positive():
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(6, 16), dim=-1)
    # Temperature 0.01 makes each positive dominate; a plain softmax would underflow the rest to 0.
    for sim in (100.0 * emb @ emb.T, torch.zeros(6, 6), torch.randn(6, 6)):
        for _ in range(20):
            text_for_image, image_for_text = hard_negatives(sim)
            assert not (text_for_image == torch.arange(6)).any()
            assert not (image_for_text == torch.arange(6)).any()
    assert hard_negatives(torch.zeros(2, 2))[0].tolist() == [1, 0]  # the only choice


def test_hard_negatives_prefer_similar_pairs():
    sim = torch.zeros(4, 4)
    sim[0, 2] = 5.0  # image 0 looks like caption 2, caption 2 like image 0
    draws = [hard_negatives(sim) for _ in range(200)]
    assert sum(t[0].item() == 2 for t, _ in draws) > 150  # p = e^5 / (e^5 + 2) ~ 0.99
    assert sum(i[2].item() == 0 for _, i in draws) > 150


def test_a_uniform_share_of_negatives_ignores_the_similarities():
    """Image 0 looks like caption 2 only: with uniform_share u it draws caption 2 with probability
    (1 - u) * ~1 + u / 3 (a uniform draw among the 3 other captions), and never itself."""
    torch.manual_seed(0)
    sim = torch.zeros(4, 4)
    sim[0, 2] = sim[2, 0] = 50.0
    for share, expected in ((0.0, 1.0), (0.5, 0.5 + 0.5 / 3), (1.0, 1 / 3)):
        draws = torch.stack([hard_negatives(sim, uniform_share=share)[0] for _ in range(3000)])
        assert not (draws == torch.arange(4)).any()
        assert (draws[:, 0] == 2).float().mean().item() == pytest.approx(expected, abs=0.03)


def test_identical_captions_are_not_drawn_as_negatives_while_others_exist():
    sim = torch.zeros(4, 4)
    sim[0, 1] = sim[1, 0] = 50.0  # image 0 looks most like caption 1 (and caption 0 like image 1)
    same = torch.zeros(4, 4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True  # captions 0 and 1 are the same text
    for _ in range(50):
        text_for_image, image_for_text = hard_negatives(sim, same)
        assert text_for_image[0] not in (0, 1) and image_for_text[0] not in (0, 1)
    only = torch.tensor([[False, True], [True, False]])  # a batch of two identical captions
    assert hard_negatives(torch.zeros(2, 2), only)[0].tolist() == [1, 0]  # still never itself


def test_itm_pairs_and_labels_are_wired_as_documented(monkeypatch):
    """_itm_loss fuses (image i, caption i) labelled 1, (image i, its sampled negative caption)
    and (its sampled negative image, caption i) labelled 0, with the negatives drawn from the
    rows and columns of the ITC similarities."""
    torch.manual_seed(0)
    config = load_config("tiny", vocab_size=50, width=32, heads=2, depth=2, fusion_layers=1)
    model = UnifiedModel(config).eval()
    B, T_ = 4, 6
    ids = torch.randint(5, 50, (B, T_))
    mask = torch.ones(B, T_, dtype=torch.bool)
    images = torch.randint(0, 256, (B, 3, 64, 64), dtype=torch.uint8)
    sim = torch.zeros(B, B)
    text_of = {0: 1, 1: 2, 2: 3, 3: 0}  # image i looks like caption text_of[i] (its row)
    for i, j in text_of.items():
        sim[i, j] = 100.0
    image_of = {j: i for i, j in text_of.items()}  # so caption j looks like image_of[j] (column)
    seen = {}
    real_scores = model.itm_scores

    def capture(memory, text_states, text_mask):
        seen.update(memory=memory, text_states=text_states)
        return real_scores(memory, text_states, text_mask)

    monkeypatch.setattr(model, "itm_scores", capture)
    with torch.no_grad():
        image_states, text_states = model.image_states(images), model.text_states(ids, mask)
        memory = model.image_memory(image_states)
        model._itm_loss(memory, text_states, ids, mask, sim)
    fused_memory, fused_texts = seen["memory"], seen["text_states"]
    image_rows = [i for i in range(B)] * 2 + [image_of[j] for j in range(B)]
    text_rows = [i for i in range(B)] + [text_of[i] for i in range(B)] + [j for j in range(B)]
    for row, (i, j) in enumerate(zip(image_rows, text_rows)):
        assert torch.equal(fused_memory.kv[0][0][row], memory.kv[0][0][i]), row
        assert torch.equal(fused_memory.cls[row], memory.cls[i]), row
        assert torch.equal(fused_texts[row], text_states[j]), row
    # With edited captions: a fourth group, image i with its own edit, labelled 0 where it has
    # one; an image without an edit adds no loss (label -100), so its row cannot change the loss.
    edited_states = torch.randn_like(text_states)
    valid = torch.tensor([True, True, False, True])
    with torch.no_grad():
        torch.manual_seed(1)
        loss, out = model._itm_loss(memory, text_states, ids, mask, sim,
                                    EditedCaptions(edited_states, mask, valid))
        torch.manual_seed(1)
        junk = edited_states.clone()
        junk[2] = 1e3
        loss_junk, _ = model._itm_loss(memory, text_states, ids, mask, sim,
                                       EditedCaptions(junk, mask, valid))
    assert seen["text_states"].shape[0] == 4 * B
    for i in range(B):
        assert torch.equal(seen["memory"].cls[3 * B + i], memory.cls[i])
    assert torch.equal(seen["text_states"][3 * B:3 * B + 2], edited_states[:2])
    assert loss == loss_junk and set(out) == {"itm_acc", "itm_edited_acc"}


def test_an_edited_caption_is_one_more_image_to_text_column():
    """One-hot oracle: image i matches text i; the edit of caption 0 equals caption 0 (a
    column tying the positive), the edit of caption 1 is missing (masked out)."""
    eye = torch.eye(2)
    loss, _, sim = contrastive_loss(eye, eye, torch.tensor(1.0), negative_emb=eye[[0, 0]],
                                    has_negative=torch.tensor([True, False]))
    e = math.e
    i2t = (math.log(2 * e + 1) - 1 + math.log(e + 2) - 1) / 2  # rows [1, 0, 1], [0, 1, 0]
    t2i = math.log(1 + e) - 1
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    assert torch.equal(sim, eye)  # ITM's sampling sees the batch columns only
    plain, _, _ = contrastive_loss(eye, eye, torch.tensor(1.0))
    none, _, _ = contrastive_loss(eye, eye, torch.tensor(1.0), negative_emb=eye,
                                  has_negative=torch.tensor([False, False]))
    assert none.item() == pytest.approx(plain.item(), rel=1e-6)


def test_contrastive_loss_on_one_process_is_clip_loss():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    loss, accuracy, sim = contrastive_loss(image, text, torch.tensor(10.0))
    logits = 10.0 * image @ text.T
    labels = torch.arange(5)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(sim, logits)
    assert 0 <= accuracy <= 1


def test_itc_logits_of_a_bf16_model_match_fp32_to_rounding():
    """DeepSpeed's bf16 engine holds every weight in bf16. The embeddings are normalised, and the
    scale exponentiated, in fp32 all the same: at the largest scale (100) the logits equal an fp32
    computation from the same bf16 projections to fp32 rounding (bf16 unit vectors and a bf16
    exp were off by up to 0.7)."""
    config = load_config("tiny", vocab_size=50, width=32, heads=2, depth=2, fusion_layers=1,
                         embed_dim=64)
    torch.manual_seed(0)
    model = UnifiedModel(config).to(torch.bfloat16)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100))
    projected = {}
    for name in ("image_proj", "text_proj"):
        getattr(model, name).register_forward_hook(
            lambda _module, _inputs, out, name=name: projected.__setitem__(name, out))
    images = torch.randn(8, 3, config.image_size, config.image_size).to(torch.bfloat16)
    ids = torch.randint(4, 50, (8, T))
    mask = torch.arange(T) < torch.randint(2, T + 1, (8, 1))
    with torch.no_grad():
        image_emb = model.image_embedding(model.image_states(images))
        text_emb = model.text_embedding(model.text_states(ids, mask), mask)
        _, _, logits = contrastive_loss(image_emb, text_emb, model.itc_logit_scale())
    assert projected["image_proj"].dtype == torch.bfloat16
    unit = {name: F.normalize(out.float(), dim=-1) for name, out in projected.items()}
    expected = model.logit_scale.float().exp() * unit["image_proj"] @ unit["text_proj"].T
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-6)


def test_vqa_loss_is_bce_summed_over_answers():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    targets = torch.tensor([[1.0, 0.3], [0.0, 0.6]])  # soft scores

    def bce(x: float, y: float) -> float:
        return math.log1p(math.exp(x)) - x * y

    expected = (bce(2.0, 1.0) + bce(-1.0, 0.3) + bce(0.5, 0.0) + bce(0.0, 0.6)) / 2  # per question
    assert vqa_loss(logits, targets).item() == pytest.approx(expected)
    assert vqa_loss(torch.zeros(2, 10), torch.zeros(2, 10)).item() == pytest.approx(10 * math.log(2))


def itc_model_and_batch():
    torch.manual_seed(0)
    config = load_config("tiny", vocab_size=50, width=32, heads=2, depth=2, fusion_layers=1)
    model = UnifiedModel(config, LossWeights(itc=1, itm=0, mlm=0))
    g = torch.Generator().manual_seed(1)
    images = torch.randn(WORLD * LOCAL_B, 3, 64, 64, generator=g)
    ids = torch.randint(4, 50, (WORLD * LOCAL_B, T), generator=g)
    mask = torch.arange(T) < torch.randint(2, T + 1, (WORLD * LOCAL_B, 1), generator=g)
    return model, images, ids, mask


def itc_rank(rank: int, port: int, out_dir: str):
    """One rank: ITC on its slice of the batch, gradients averaged over ranks as DDP does."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    model, images, ids, mask = itc_model_and_batch()
    part = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    loss = model(images[part], ids[part], mask[part])["loss"]
    loss.backward()
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= WORLD
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.save({"loss": total / WORLD, "grads": {n: p.grad for n, p in model.named_parameters()}},
               f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_itc_on_two_ranks_equals_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(itc_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD)
    model, images, ids, mask = itc_model_and_batch()
    loss = model(images, ids, mask)["loss"]
    loss.backward()
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(result["loss"], loss.detach())
        for name, param in model.named_parameters():
            if param.grad is None:
                assert result["grads"][name] is None, name
            else:
                torch.testing.assert_close(result["grads"][name], param.grad, atol=1e-6, rtol=1e-4)


def test_itm_ranks_each_caption_above_its_own_edit(monkeypatch):
    """Stub scorer oracle: fixed (no match, match) logits per fused pair. The loss is the match
    cross-entropy over the 4B pairs (edits without an edit ignored) plus the mean over images
    with an edit of -log sigmoid(log-odds(caption) - log-odds(edit))."""
    config = load_config("tiny", vocab_size=50, width=32, heads=2, depth=2, fusion_layers=1)
    model = UnifiedModel(config).eval()
    B, T_ = 2, 5
    ids = torch.arange(B * T_).view(B, T_) + 5  # distinct captions
    mask = torch.ones(B, T_, dtype=torch.bool)
    with torch.no_grad():
        memory = model.image_memory(model.image_states(
            torch.randint(0, 256, (B, 3, 64, 64), dtype=torch.uint8)))
        states = model.text_states(ids, mask)
    # pairs: positives, (image, negative text), (negative image, text), (image, its edit)
    odds = torch.tensor([2.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 3.0])
    logits = torch.stack([torch.zeros(4 * B), odds], dim=1)
    monkeypatch.setattr(model, "itm_scores", lambda memory, texts, masks: logits)
    valid = torch.tensor([True, False])
    loss, out = model._itm_loss(memory, states, ids, mask, torch.zeros(B, B),
                                EditedCaptions(states.flip(0), mask, valid))
    labels = torch.tensor([1, 1, 0, 0, 0, 0, 0, -100])
    match = F.cross_entropy(logits, labels, ignore_index=-100)
    ranking = F.softplus(-(odds[0] - odds[6]))  # image 0 only: image 1 has no edit
    assert loss.item() == pytest.approx((match + ranking).item(), rel=1e-6)
    assert out["itm_edited_acc"].item() == 1.0  # 2.0 > 0.5; image 1's 3.0 does not count


def test_itc_accuracy_averages_the_two_directions():
    """One-hot oracle: every image finds its caption (i2t 3/3), but captions 1 and 2 lean
    towards image 0, so only caption 0 finds its image (t2i 1/3): accuracy (1 + 1/3) / 2."""
    image = torch.eye(3)
    text = F.normalize(torch.eye(3) + 2 * torch.eye(3)[0], dim=-1)  # e_j + 2 e_0
    text[0] = image[0]
    _, accuracy, _ = contrastive_loss(image, text, torch.tensor(10.0))
    assert accuracy.item() == pytest.approx(2 / 3)
    # every pair matches both ways: each row's own argmax, not one argmax over the whole matrix
    _, accuracy, _ = contrastive_loss(image, image, torch.tensor(10.0))
    assert accuracy.item() == 1.0


def _itc_on_rank(rank: int, port: int, image, text, scale, out: str | None = None):
    """ITC on this rank's half of (image, text) with gloo; the loss, accuracy, local similarities
    and the gradients of the local embeddings (of the sum of both ranks' losses)."""
    if out is not None:  # a forked child: the parent's OpenMP threads are not there
        torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=15))
    try:
        part = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        image, text = image[part].clone().requires_grad_(), text[part].clone().requires_grad_()
        gathered = []

        def timed(x):  # as the training comms log's timed gather
            gathered.append(list(x.shape))
            return all_gather(x)

        set_gather(timed)
        loss, accuracy, sim = contrastive_loss(image, text, scale)
        loss.backward()
        result = {"loss": loss.detach(), "accuracy": accuracy, "sim": sim,
                  "image_grad": image.grad, "text_grad": text.grad, "gathered": gathered}
    finally:
        set_gather()
        dist.destroy_process_group()
    if out is not None:
        torch.save(result, out)
    return result


def test_contrastive_loss_on_two_ranks_equals_one_process_on_the_whole_batch(tmp_path):
    """This process is rank 0 and a forked child rank 1 (a fork shares this process's code, so
    a mutated loss runs on both), gathering through set_gather's gather. Averaged over ranks,
    the loss and accuracy are those of one process on the concatenated batch; each rank's local
    similarities are its diagonal block, and its embeddings get their share of the gradient of
    the sum of the ranks' losses."""
    g = torch.Generator().manual_seed(3)
    image = F.normalize(torch.randn(WORLD * LOCAL_B, 4, generator=g), dim=-1)
    text = F.normalize(image + 0.8 * torch.randn(WORLD * LOCAL_B, 4, generator=g), dim=-1)
    scale = torch.tensor(5.0)
    port, out = free_port(), str(tmp_path / "rank1.pt")
    child = mp.get_context("fork").Process(target=_itc_on_rank,
                                           args=(1, port, image, text, scale, out))
    child.start()
    ranks = [_itc_on_rank(0, port, image, text, scale)]
    child.join(timeout=30)
    assert child.exitcode == 0
    ranks.append(torch.load(out, weights_only=True))

    whole_image, whole_text = image.clone().requires_grad_(), text.clone().requires_grad_()
    loss, accuracy, sim = contrastive_loss(whole_image, whole_text, scale)
    (WORLD * loss).backward()  # each rank's loss is a mean over LOCAL_B of WORLD * LOCAL_B rows
    assert 0 < accuracy.item() < 1
    assert torch.allclose(sum(r["loss"] for r in ranks) / WORLD, loss.detach())
    assert sum(r["accuracy"].item() for r in ranks) / WORLD == pytest.approx(accuracy.item())
    for rank, result in enumerate(ranks):
        part = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        assert result["gathered"] == [[LOCAL_B, 4]] * 2  # both embeddings, through set_gather's
        assert torch.allclose(result["sim"], sim[part, part])
        assert torch.allclose(result["image_grad"], whole_image.grad[part])
        assert torch.allclose(result["text_grad"], whole_text.grad[part])


def test_each_image_and_each_text_draws_uniformly_by_its_own_coin(monkeypatch):
    """Image i's hard negative is caption i+1, caption j's is image j-1. The coins (a stub for
    torch.rand: row 0 the images', row 1 the texts') make image 1 and caption 3 draw uniformly:
    every other draw is its hard negative, those two spread over all three candidates."""
    sim = torch.zeros(4, 4)
    sim[torch.arange(4), (torch.arange(4) + 1) % 4] = 50.0
    coins = torch.tensor([[0.9, 0.1, 0.9, 0.9], [0.9, 0.9, 0.9, 0.1]])
    monkeypatch.setattr(torch, "rand", lambda *size, device=None: coins.clone())
    torch.manual_seed(0)
    draws = [hard_negatives(sim, uniform_share=0.5) for _ in range(60)]
    texts, images = torch.stack([t for t, _ in draws]), torch.stack([i for _, i in draws])
    assert (texts[:, [0, 2, 3]] == torch.tensor([1, 3, 0])).all()
    assert (images[:, [0, 1, 2]] == torch.tensor([3, 0, 1])).all()
    assert sorted(set(texts[:, 1].tolist())) == [0, 2, 3]
    assert sorted(set(images[:, 3].tolist())) == [0, 1, 2]


def test_no_uniform_share_means_no_uniform_draw_even_on_a_zero_coin(monkeypatch):
    """torch.rand can return exactly 0.0: with uniform_share 0 that must not count as a coin
    that came up uniform."""
    sim = torch.zeros(3, 3)
    sim[torch.arange(3), (torch.arange(3) + 1) % 3] = 50.0
    monkeypatch.setattr(torch, "rand", lambda *size, device=None: torch.zeros(size))
    for _ in range(20):
        text_for_image, image_for_text = hard_negatives(sim)
        assert text_for_image.tolist() == [1, 2, 0] and image_for_text.tolist() == [2, 0, 1]


def test_gumbel_argmax_draws_from_the_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 2.0, 5.0]).log().expand(20000, 3)  # p = 1/8, 2/8, 5/8
    counts = torch.bincount(gumbel_argmax(logits), minlength=3) / 20000
    assert (counts - torch.tensor([0.125, 0.25, 0.625])).abs().max() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_uniform_draw_of_exactly_zero_still_samples_by_the_logits(monkeypatch, dtype):
    """log(-log(0)) is infinite; the draw is clamped to the dtype's smallest normal, so every
    column gets the same finite noise and the largest logit wins."""
    monkeypatch.setattr(torch, "rand_like", lambda x: torch.zeros_like(x))
    logits = torch.tensor([[0.0, 1.0, -1.0], [1.0, 2.0, 3.0]], dtype=dtype)
    assert gumbel_argmax(logits).tolist() == [1, 2]


def test_itc_and_sampling_create_their_tensors_on_the_inputs_device():
    """On the meta device a tensor made on the CPU (labels, masks) fails to combine with the
    inputs, as it would on a GPU."""
    emb, valid = torch.zeros(3, 4, device="meta"), torch.ones(3, dtype=torch.bool, device="meta")
    out = contrastive_loss(emb, emb, torch.ones((), device="meta"), emb, valid)
    assert {t.device.type for t in out} == {"meta"}
    sim = torch.zeros(3, 3, device="meta")
    for share in (0.0, 0.5):
        assert {t.device.type for t in hard_negatives(sim, uniform_share=share)} == {"meta"}


def test_token_cross_entropy_averages_over_the_tokens_with_a_target():
    """Rows predict tokens 0, 1, 1, 1 with logit 2 against 0; targets 0, none, 2, 1: the loss is
    the mean of two hits and one miss, the accuracy 2 of 3 (the ignored row's argmax counts
    neither way)."""
    logits = torch.zeros(4, 3)
    logits[torch.arange(4), torch.tensor([0, 1, 1, 1])] = 2.0
    targets = torch.tensor([0, -100, 2, 1])
    hit, miss = math.log(math.exp(2) + 2) - 2, math.log(math.exp(2) + 2)
    loss, accuracy = token_cross_entropy(logits, targets)
    assert loss.item() == pytest.approx((2 * hit + miss) / 3)
    assert accuracy.item() == pytest.approx(2 / 3)
    one, one_accuracy = token_cross_entropy(logits[2:3], targets[2:3])  # a single target: a miss
    assert one.item() == pytest.approx(miss) and one_accuracy.item() == 0.0
    none = token_cross_entropy(logits, torch.full((4,), -100))
    assert none[0].item() == 0.0 and none[1].item() == 0.0  # not NaN
