"""Caption generation: greedy and beam search over the LM (captioning) pass, batched.

    images -> image memory (patch keys/values per top block, once) -> prefill: BOS through the
    bottom blocks and the fused pass under the seq2seq mask, every block's keys and values
    cached -> per step: the new token alone through every block, attending the image memory and
    the cache -> tied MLM head -> next-token log-probabilities

With the cache a step costs one position's work in every block (plus attention over the cached
keys), so a caption's cost grows linearly with its length; without it (`use_cache=False`, the
reference) every step recomputes the whole prefix. Both paths give the same tokens. Rows whose
caption is finished are dropped from the batch, so they cost nothing more.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import UnifiedModel
from .multiway import KVCache


@dataclass(frozen=True)
class DecodingConfig:
    """How captions are decoded; `max_length` counts generated tokens, the end token included."""

    max_length: int = 30
    beam_size: int = 1  # 1 = greedy
    length_penalty: float = 1.0  # beam score = sum of log-probs / length ** length_penalty
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this size occurs twice in a caption
    use_cache: bool = True

    def __post_init__(self):
        checks = [(self.max_length >= 1, f"max_length must be >= 1, got {self.max_length}"),
                  (self.beam_size >= 1, f"beam_size must be >= 1, got {self.beam_size}"),
                  (self.no_repeat_ngram_size >= 0,
                   f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class _LanguageModel:
    """Next-token log-probabilities for N sequences that share a growing prefix length.

    `start` reads [BOS] for each image; `advance` appends one token per row; `select` keeps (and
    repeats) rows. The cached and the recomputing variant differ only inside.
    """

    def __init__(self, model: UnifiedModel, images: torch.Tensor, bos_id: int, use_cache: bool,
                 suppress_ids: tuple[int, ...]):
        self.model, self.use_cache = model, use_cache
        self.memory = model.image_memory(model.image_states(images))  # computed once per image
        B = images.size(0)
        self.tokens = torch.full((B, 1), bos_id, dtype=torch.long, device=images.device)
        capacity = model.config.max_text_len
        self.caches = ([KVCache(capacity) for _ in model.bottom]  # text
                       + [KVCache(1 + capacity) for _ in model.top]  # image CLS and text
                       ) if use_cache else None
        self.suppress = list(suppress_ids)

    def start(self) -> torch.Tensor:
        mask = torch.ones_like(self.tokens, dtype=torch.bool)
        states = self.model.lm_text_states(self.memory, self.tokens, mask, self.caches)
        return self._log_probs(states[:, -1])

    def advance(self, token_ids: torch.Tensor) -> torch.Tensor:
        self.tokens = torch.cat([self.tokens, token_ids[:, None]], dim=1)
        if self.use_cache:
            return self._log_probs(self.model.lm_step(self.memory, token_ids, self.caches))
        mask = torch.ones_like(self.tokens, dtype=torch.bool)
        states = self.model.lm_text_states(self.memory, self.tokens, mask)
        return self._log_probs(states[:, -1])

    def select(self, rows: torch.Tensor) -> None:
        self.tokens, self.memory = self.tokens[rows], self.memory.select(rows)
        for cache in self.caches or ():
            cache.select(rows)

    def _log_probs(self, states: torch.Tensor) -> torch.Tensor:
        log_probs = self.model.mlm_head(states).float().log_softmax(dim=-1)  # (N, vocab)
        log_probs[:, self.suppress] = float("-inf")
        return log_probs


@torch.inference_mode()
def generate(
    model: UnifiedModel,
    images: torch.Tensor,
    bos_id: int,
    eos_id: int,
    config: DecodingConfig = DecodingConfig(),
    suppress_ids: tuple[int, ...] = (),
) -> list[list[int]]:
    """Token ids of one caption per image (B, 3, S, S), without BOS and the end token.

    Decoding starts from `bos_id` and a caption ends at `eos_id` or after `config.max_length`
    tokens; `suppress_ids` are never generated (padding, mask and other special tokens).
    """
    max_length = min(config.max_length, model.config.max_text_len - 1)  # BOS takes a position
    lm = _LanguageModel(model, images, bos_id, config.use_cache, suppress_ids)
    if config.beam_size == 1:
        return _greedy(lm, eos_id, max_length, config.no_repeat_ngram_size)
    return _beam_search(lm, eos_id, max_length, config)


def _greedy(lm: _LanguageModel, eos_id: int, max_length: int, ngram: int) -> list[list[int]]:
    B = lm.tokens.size(0)
    captions: list[list[int]] = [[] for _ in range(B)]
    alive = torch.arange(B)  # caption index of each row still decoding
    log_probs = lm.start()
    for step in range(max_length):
        _ban_repeated_ngrams(log_probs, lm.tokens, ngram)
        tokens = log_probs.argmax(dim=-1)
        for row, token in zip(alive.tolist(), tokens.tolist()):
            captions[row].append(token)
        going = (tokens != eos_id).nonzero().squeeze(1)
        if step == max_length - 1 or len(going) == 0:
            break
        alive, tokens = alive[going.cpu()], tokens[going]
        lm.select(going)
        log_probs = lm.advance(tokens)
    return [c[:-1] if c and c[-1] == eos_id else c for c in captions]


def _beam_search(lm: _LanguageModel, eos_id: int, max_length: int,
                 config: DecodingConfig) -> list[list[int]]:
    """Beam search as HF transformers' (its default stopping rule, early_stopping=False).

    Each step keeps the best `2 * beam_size` continuations of an image's beams: an end token
    among the first `beam_size` of them finishes a caption, the best `beam_size` others continue.
    An image keeps its `beam_size` best finished captions and is done when the best continuing
    beam, scored at its current length, cannot beat the worst of them; at max_length the beams
    still going finish as they are.
    """
    k = config.beam_size
    B = lm.tokens.size(0)
    device = lm.tokens.device
    log_probs = lm.start()
    expand = torch.arange(B, device=device).repeat_interleave(k)  # k rows per image
    lm.select(expand)
    log_probs = log_probs[expand]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    images = list(range(B))  # image of each group of k rows still decoding
    beams = [[] for _ in range(B * k)]  # tokens of each row
    scores = torch.full((B, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # the k rows of an image start identical: expand only the first
    for step in range(max_length):
        _ban_repeated_ngrams(log_probs, lm.tokens, config.no_repeat_ngram_size)
        vocab = log_probs.size(1)
        total = (scores.reshape(-1, 1) + log_probs).view(len(images), k * vocab)
        top_scores, top_index = total.topk(2 * k, dim=1)  # (G, 2k)
        rows, tokens, new_scores, groups = [], [], [], []
        for g, image in enumerate(images):
            kept = []
            for rank, (score, index) in enumerate(zip(top_scores[g].tolist(),
                                                      top_index[g].tolist())):
                row, token = g * k + index // vocab, index % vocab
                if score == float("-inf"):
                    break
                if token == eos_id or step == max_length - 1:
                    if rank < k:
                        caption = beams[row] + ([] if token == eos_id else [token])
                        normalised = score / (step + 1) ** config.length_penalty
                        finished[image] = sorted(finished[image] + [(normalised, caption)],
                                                 key=lambda h: -h[0])[:k]
                elif len(kept) < k:
                    kept.append((row, token, score))
                if len(kept) == k:
                    break
            if not kept or (len(finished[image]) == k and finished[image][-1][0]
                            >= kept[0][2] / (step + 1) ** config.length_penalty):
                continue
            kept += [kept[-1][:2] + (float("-inf"),)] * (k - len(kept))  # pad with dead beams
            groups.append(image)
            for row, token, score in kept:
                rows.append(row)
                tokens.append(token)
                new_scores.append(score)
        if not groups:
            break
        index = torch.tensor(rows, device=device)
        beams = [beams[r] + [t] for r, t in zip(rows, tokens)]
        images = groups
        scores = torch.tensor(new_scores, device=device).view(len(images), k)
        lm.select(index)
        log_probs = lm.advance(torch.tensor(tokens, device=device))
    return [hyps[0][1] if hyps else [] for hyps in finished]


def _ban_repeated_ngrams(log_probs: torch.Tensor, tokens: torch.Tensor, n: int) -> None:
    """Forbid, in place, each token that would repeat an n-gram of its row's `tokens` (N, T)."""
    if n <= 0 or tokens.size(1) < n:
        return
    grams = tokens.unfold(1, n, 1)  # (N, T - n + 1, n)
    current = tokens[:, tokens.size(1) - n + 1 :]  # (N, n - 1): the n-gram being completed
    repeats = (grams[:, :, :-1] == current[:, None]).all(dim=2)  # (N, T - n + 1)
    banned = torch.zeros_like(log_probs).scatter_add_(1, grams[:, :, -1], repeats.float())
    log_probs.masked_fill_(banned > 0, float("-inf"))
