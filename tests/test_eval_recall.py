"""Recall@k from embeddings: chunked ranks against a brute-force full-matrix computation."""
import math

import numpy as np
import pytest
import torch

from vlp.pipeline.eval.retrieval import recall
from vlp.pipeline.eval.retrieval.recall import (
    captions_per_image,
    chance_recalls,
    index_ranks,
    itc_ranks,
    recalls_from_ranks,
    reranked_ranks,
    retrieval_recalls,
)


def brute_force_recalls(image_emb, text_emb, text_to_image, ks=(1, 5, 10)):
    """The naive definition: full score matrix, ties counted against the query."""
    scores = text_emb @ image_emb.T  # (T, I)
    t2i = torch.as_tensor(text_to_image)
    metrics = {}
    for k in ks:
        hits = []
        for t in range(len(text_emb)):
            positive = scores[t, t2i[t]]
            rank = sum(1 for i in range(len(image_emb))
                       if i != t2i[t] and scores[t, i] >= positive)
            hits.append(rank < k)
        metrics[f"image_retrieval_recall@{k}"] = sum(hits) / len(hits)
    for k in ks:
        hits = []
        for i in range(len(image_emb)):
            captions = [t for t in range(len(text_emb)) if t2i[t] == i]
            if not captions:
                continue
            best = max(scores[t, i] for t in captions)
            rank = sum(1 for t in range(len(text_emb)) if t2i[t] != i and scores[t, i] >= best)
            hits.append(rank < k)
        metrics[f"text_retrieval_recall@{k}"] = sum(hits) / len(hits)
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics


def random_set(num_images=40, per_image=5, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=g), dim=-1)
    text_to_image = [i for i in range(num_images) for _ in range(per_image)]
    # captions near their image, so recalls are neither 0 nor 1
    texts = images[text_to_image] + 0.8 * torch.randn(len(text_to_image), dim, generator=g)
    return images, torch.nn.functional.normalize(texts, dim=-1), text_to_image


def test_matches_brute_force_with_several_captions_per_image():
    images, texts, t2i = random_set()
    expected = brute_force_recalls(images, texts, t2i)
    got = retrieval_recalls(images, texts, t2i)
    assert got == pytest.approx(expected)
    assert 0 < got["image_retrieval_recall@1"] < got["image_retrieval_recall@10"] < 1


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunk_size_does_not_change_the_result(chunk):
    images, texts, t2i = random_set(num_images=30, per_image=3, seed=1)
    chunked = retrieval_recalls(images, texts, t2i, chunk=chunk)
    assert chunked == retrieval_recalls(images, texts, t2i, chunk=len(texts))


def test_ties_count_against_the_query():
    # Quantised embeddings produce many exact ties; a constant model must score 0 at k=1.
    images, texts, t2i = random_set(num_images=20, per_image=2, dim=4, seed=2)
    images, texts = images.sign() / 2, texts.sign() / 2
    expected = brute_force_recalls(images, texts, t2i)
    assert retrieval_recalls(images, texts, t2i, chunk=7) == pytest.approx(expected)
    constant = retrieval_recalls(torch.ones(20, 4), torch.ones(40, 4), t2i)
    assert constant["image_retrieval_recall@1"] == 0 and constant["text_retrieval_recall@10"] == 0


def test_perfect_embeddings_and_uneven_caption_counts():
    images = torch.eye(6)
    t2i = [0, 0, 1, 2, 2, 2, 3, 5]  # image 4 has no caption: gallery only, not an i2t query
    metrics = retrieval_recalls(images, images[t2i], t2i)
    assert all(v == 1.0 for v in metrics.values())


def test_image_to_text_hit_if_any_caption_in_top_k():
    images = torch.eye(3)
    # image 0 has a bad and a good caption
    texts = torch.tensor([[0.0, 1, 0], [1.0, 0, 0], [0.0, 0, 1]])
    metrics = retrieval_recalls(images, texts, [0, 0, 2])
    assert metrics["text_retrieval_recall@1"] == 1.0
    assert metrics["image_retrieval_recall@1"] == pytest.approx(2 / 3)


def test_an_oracle_reranker_lifts_every_hit_in_the_top_k_to_rank_one():
    images, texts, t2i = random_set(num_images=30, per_image=2, seed=3)
    truth = torch.as_tensor(t2i)
    calls = []

    def oracle(text_idx, image_idx):  # log-odds +5 for the true pairs, -5 for the others
        calls.append((text_idx.clone(), image_idx.clone()))
        return (truth[text_idx] == image_idx).float() * 10 - 5

    base = retrieval_recalls(images, texts, t2i)
    metrics = retrieval_recalls(images, texts, t2i, rerank_k=5, pair_scorer=oracle)
    assert {k: v for k, v in metrics.items() if not k.startswith("reranked_")} == base
    for direction in ("image", "text"):
        key = f"reranked_{direction}_retrieval_recall@"
        assert metrics[key + "1"] == pytest.approx(base[key[9:] + "5"])
        assert metrics[key + "5"] == pytest.approx(base[key[9:] + "5"])
        assert metrics[key + "10"] == pytest.approx(base[key[9:] + "10"])
    # one call; every pair of both directions' top 5, each distinct pair once
    ((text_idx, image_idx),) = calls
    pairs = set(zip(text_idx.tolist(), image_idx.tolist()))
    assert len(pairs) == len(text_idx) <= 60 * 5 + 30 * 5


def test_an_inverted_reranker_drops_each_hit_to_the_bottom_of_the_top_k():
    """Scores that prefer the wrong pairs: a positive found in the top 5 ends up behind the other
    candidates there (rank 4 when it is the only positive), never beyond the top 5."""
    images, texts, t2i = random_set(num_images=30, per_image=1, seed=4)
    truth = torch.as_tensor(t2i)
    metrics = retrieval_recalls(images, texts, t2i, rerank_k=5,
                                pair_scorer=lambda t, i: (truth[t] != i).float())
    base = retrieval_recalls(images, texts, t2i)
    assert metrics["reranked_image_retrieval_recall@1"] == 0.0
    assert metrics["reranked_image_retrieval_recall@5"] == pytest.approx(
        base["image_retrieval_recall@5"])


def test_the_itc_logit_decides_where_the_pair_score_is_silent():
    """Re-ranking by pair score + itc_weight * cosine: a constant pair score keeps the ITC order
    exactly; a pair score that separates by more than the ITC logits' spread overrides it."""
    images, texts, t2i = random_set(num_images=30, per_image=1, seed=5)
    truth = torch.as_tensor(t2i)
    base = retrieval_recalls(images, texts, t2i)
    silent = retrieval_recalls(images, texts, t2i, rerank_k=5, itc_weight=10.0,
                               pair_scorer=lambda t, i: torch.full(t.shape, 3.0))
    assert {key[9:]: value for key, value in silent.items() if key.startswith("reranked_")} == (
        pytest.approx(base))
    # A weak oracle (+-0.5) under a large ITC weight moves nothing; under ITC weight 0 it lifts
    # every hit of the top 5 to rank 1.
    weak = lambda t, i: (truth[t] == i).float() - 0.5  # noqa: E731
    outvoted = retrieval_recalls(images, texts, t2i, rerank_k=5, itc_weight=1000.0,
                                 pair_scorer=weak)
    assert outvoted["reranked_image_retrieval_recall@1"] == pytest.approx(
        base["image_retrieval_recall@1"])
    alone = retrieval_recalls(images, texts, t2i, rerank_k=5, pair_scorer=weak)
    assert alone["reranked_image_retrieval_recall@1"] == pytest.approx(
        base["image_retrieval_recall@5"])
    assert base["image_retrieval_recall@1"] < base["image_retrieval_recall@5"]  # room to move


def test_the_defaults_rerank_nothing_and_then_by_the_pair_score_alone():
    """A pair scorer without rerank_k re-ranks nothing. With rerank_k, the default itc_weight is
    0: a scorer that marks the true pair 0.5 lower loses it at k=1 although ITC (cosine 1 against
    0) would keep it first."""
    lower = lambda t, i: -0.5 * (t == i).float()  # noqa: E731
    assert retrieval_recalls(torch.eye(2), torch.eye(2), [0, 1], pair_scorer=lower) == (
        retrieval_recalls(torch.eye(2), torch.eye(2), [0, 1]))
    metrics = retrieval_recalls(torch.eye(2), torch.eye(2), [0, 1], ks=(1,), rerank_k=2,
                                pair_scorer=lower)
    assert metrics["reranked_image_retrieval_recall@1"] == 0.0
    assert metrics["image_retrieval_recall@1"] == 1.0


def test_a_negative_tied_with_the_positive_after_reranking_ranks_ahead_of_it():
    ranks = reranked_ranks(torch.tensor([1, 1]), torch.tensor([[3, 5], [3, 5]]),
                           torch.tensor([[2.0, 2.0], [1.0, 2.0]]), torch.tensor([[5], [5]]))
    assert ranks.tolist() == [1, 0]


def test_images_without_captions_ask_no_image_to_text_query():
    """Image 1 has no caption: it stays in the captions' gallery but is left out of the
    image->text average. Image 0 ties with image 2's caption (a miss), image 2 finds its own."""
    texts = torch.tensor([[1.0, 0, 0], [1.0, 0, 0.5]])  # captions of images 0 and 2
    metrics = retrieval_recalls(torch.eye(3), texts, [0, 2], ks=(1,))
    assert metrics["text_retrieval_recall@1"] == 0.5  # over images 0 and 2, not 1 of 3
    assert metrics["image_retrieval_recall@1"] == 0.5  # image 2's caption prefers image 0


def test_caption_indices_of_any_number_type_give_the_same_recalls():
    """A list, int32 arrays, or a table column of floats."""
    images, texts, t2i = random_set(num_images=8, per_image=2, seed=7)
    expected = retrieval_recalls(images, texts, t2i)
    for column in (np.array(t2i, dtype=np.int32), torch.tensor(t2i, dtype=torch.int32),
                   np.array(t2i, dtype=np.float64)):
        assert retrieval_recalls(images, texts, column) == expected


def test_chance_is_the_average_of_random_embeddings():
    t2i = [i for i in range(50) for _ in range(5)]
    chance = chance_recalls(50, t2i)
    assert chance["image_retrieval_recall@5"] == pytest.approx(5 / 50)
    assert chance["text_retrieval_recall@1"] == pytest.approx(5 / 250)  # 1 of 5 captions in 250
    miss_all_five = math.comb(245, 10) / math.comb(250, 10)
    assert chance["text_retrieval_recall@10"] == pytest.approx(1 - miss_all_five)
    g = torch.Generator().manual_seed(0)
    runs = []
    for _ in range(20):
        images = torch.nn.functional.normalize(torch.randn(50, 64, generator=g), dim=-1)
        texts = torch.nn.functional.normalize(torch.randn(250, 64, generator=g), dim=-1)
        runs.append(retrieval_recalls(images, texts, t2i)["mean_recall"])
    assert sum(runs) / len(runs) == pytest.approx(chance["mean_recall"], abs=0.03)


def test_the_exact_index_gives_the_torch_paths_recalls():
    """faiss's IndexFlatIP, which `auto` uses for large candidate sets, against the torch path:
    the same recalls both ways, with an imperfect re-ranker on distinct embeddings (which of two
    tied candidates makes a top k is arbitrary in either path), then with exact ties, which
    count against the query in both, also where they run past the index's nearest k."""
    pytest.importorskip("faiss", reason="install the faiss extra: pip install '.[faiss]'")
    images, texts, t2i = random_set(num_images=200, per_image=7, dim=32, seed=5)
    truth = torch.as_tensor(t2i)

    def scorer(text_idx, image_idx):  # an imperfect ITM: the truth, plus noise from the indices
        return (truth[text_idx] == image_idx).float() + torch.sin(text_idx * 7.0 + image_idx)

    reranked = dict(rerank_k=8, pair_scorer=scorer)
    with_index = retrieval_recalls(images, texts, t2i, search="faiss", **reranked)
    assert with_index == retrieval_recalls(images, texts, t2i, search="torch", **reranked)
    assert 0 < with_index["image_retrieval_recall@1"] < with_index["image_retrieval_recall@10"] < 1
    assert with_index["reranked_image_retrieval_recall@1"] != with_index[
        "image_retrieval_recall@1"]
    images[1] = images[0]
    texts[:7] = images[0]  # image 0's captions and the 14 of images 1 and 2 all tie for
    texts[7:21] = images[0]  # image 0: 14 negatives as high as its best caption, past every k
    tied = retrieval_recalls(images, texts, t2i, search="faiss")
    assert tied == retrieval_recalls(images, texts, t2i, search="torch")


# With one-hot candidates a query's embedding is its row of scores.
KNOWN_SCORES = torch.tensor([[0.9, 0.5, 0.7, 0.1],    # positive 1: 0.9 and 0.7 ahead -> rank 2
                             [0.2, 0.8, 0.3, 0.6],    # positives 0, 3: best 0.6, 0.8 ahead -> 1
                             [0.4, 0.3, 0.2, 0.1],    # no positive -> -1
                             [0.5, 0.5, 0.0, -0.1]])  # positive 1 ties with 0 -> rank 1
KNOWN_POSITIVES = torch.tensor([[1, -1], [0, 3], [-1, -1], [1, -1]])


def test_ranks_from_known_scores():
    """Ranks count the negatives at least as high as the best positive (ties against the
    query), whatever the chunk; the top candidates come with their scores."""
    scores, positives = KNOWN_SCORES, KNOWN_POSITIVES
    for chunk in (1, 3, 4):
        ranks, top, sims = itc_ranks(scores, torch.eye(4), positives, chunk=chunk, top_k=2)
        assert ranks.tolist() == [2, 1, -1, 1]
        assert top[:3].tolist() == [[0, 2], [1, 3], [0, 1]]
        assert torch.allclose(sims[:3], torch.tensor([[0.9, 0.7], [0.8, 0.6], [0.4, 0.3]]))
    assert itc_ranks(scores, torch.eye(4), positives)[1].shape == (4, 0)  # no top by default
    assert itc_ranks(scores, torch.eye(4), positives, top_k=9)[1].shape == (4, 4)


def test_the_index_gives_known_ranks_to_its_depth():
    """The known scores above through the index; then a positive ranked 5th, which the index
    finds looking 10 deep, and reports as `depth` (1) looking only as deep as the largest k."""
    pytest.importorskip("faiss", reason="install the faiss extra: pip install '.[faiss]'")
    scores, positives = KNOWN_SCORES, KNOWN_POSITIVES
    ranks, top, sims = index_ranks(scores, torch.eye(4), positives, top_k=2, depth=10)
    assert ranks.tolist() == [2, 1, -1, 1] and top[:3].tolist() == [[0, 2], [1, 3], [0, 1]]
    assert torch.allclose(sims[:3], torch.tensor([[0.9, 0.7], [0.8, 0.6], [0.4, 0.3]]))
    scores = torch.linspace(0.8, 0.1, 8)[None]
    positives = torch.tensor([[5]])
    assert itc_ranks(scores, torch.eye(8), positives)[0].tolist() == [5]
    assert index_ranks(scores, torch.eye(8), positives, top_k=0, depth=10)[0].tolist() == [5]
    assert index_ranks(scores, torch.eye(8), positives, top_k=0, depth=1)[0].tolist() == [1]


def test_recall_at_k_counts_ranks_below_k():
    metrics = recalls_from_ranks(torch.tensor([0, 4, 5, 9, 10]), torch.tensor([1, 0]), (1, 5, 10))
    assert metrics == pytest.approx({
        "image_retrieval_recall@1": 1 / 5, "image_retrieval_recall@5": 2 / 5,
        "image_retrieval_recall@10": 4 / 5, "text_retrieval_recall@1": 1 / 2,
        "text_retrieval_recall@5": 1.0, "text_retrieval_recall@10": 1.0,
        "mean_recall": (1 / 5 + 2 / 5 + 4 / 5 + 1 / 2 + 1 + 1) / 6})
    assert list(retrieval_recalls(torch.eye(2), torch.eye(2), [0, 1])) == list(metrics)


def test_captions_per_image_table():
    table = captions_per_image(torch.tensor([2, 0, 2, 3]), 5)
    assert table.tolist() == [[1, -1], [-1, -1], [0, 2], [3, -1], [-1, -1]]
    assert captions_per_image(torch.tensor([], dtype=torch.long), 3).tolist() == [[-1]] * 3


def test_chance_with_fewer_captions_than_k():
    """3 images, captions of images 0, 0, 1: at k=5 every ranking hits; at k=1 image 0 (2 of 3
    captions) hits 2/3 of the time, image 1 1/3, image 2 (no caption) is no query."""
    chance = chance_recalls(3, [0, 0, 1], ks=(1, 5))
    assert chance == pytest.approx({
        "image_retrieval_recall@1": 1 / 3, "image_retrieval_recall@5": 1.0,
        "text_retrieval_recall@1": 1 / 2, "text_retrieval_recall@5": 1.0,
        "mean_recall": (1 / 3 + 1 + 1 / 2 + 1) / 4})
    # the indices as a table column of floats, which retrieval_recalls takes too
    assert chance_recalls(3, np.array([0.0, 0.0, 1.0]), ks=(1, 5)) == chance


def test_rerank_needs_a_scorer_and_captions_need_an_image_each():
    images, texts, t2i = random_set(num_images=6, per_image=2, seed=6)
    assert retrieval_recalls(images, texts, t2i, rerank_k=5) == retrieval_recalls(
        images, texts, t2i)
    with pytest.raises(ValueError, match="text_to_image has 11 entries for 12 captions"):
        retrieval_recalls(images, texts, t2i[:-1])


def test_auto_search_takes_the_index_from_20000_candidates_when_faiss_is_installed(monkeypatch):
    calls = []
    monkeypatch.setattr(recall, "index_ranks", lambda *args: calls.append(("faiss", *args)))
    monkeypatch.setattr(recall, "itc_ranks", lambda *args: calls.append(("torch", *args)))
    query, positives = torch.zeros(1, 2), torch.zeros(1, 1, dtype=torch.long)
    for search, candidates in [("auto", 20_000), ("auto", 19_999), ("torch", 20_000),
                               ("faiss", 10)]:
        recall.ranks_by(search, query, torch.zeros(candidates, 2), positives, 7, 3, 10)
    monkeypatch.setattr(recall.importlib.util, "find_spec", lambda name: None)
    recall.ranks_by("auto", query, torch.zeros(20_000, 2), positives, 7, 3, 10)
    assert [(c[0], len(c[2])) for c in calls] == [
        ("faiss", 20_000), ("torch", 19_999), ("torch", 20_000), ("faiss", 10), ("torch", 20_000)]
    assert [c[3:] for c in calls[:2]] == [(positives, 3, 10), (positives, 7, 3)]
    assert calls[0][1] is query
