"""Turn directions in embedding space into vocabulary tokens a person can read.

Two readings, matching the two sides of J_i:
* a left singular vector u lives in the output space (where y lives): the LM head W maps it to logits, and the tokens
  whose logits it raises most name the concept it writes (W u; y is taken after the final norm, so nothing else is
  applied);
* a right singular vector v lives in the input space: the input-embedding rows nearest to it by cosine name the input
  concept J_i responds to most.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from linlens.contract import ExplainOptions, TokenScore


class TokenDecoder:
    """Decodes vectors to tokens for one model. Built once per model; decoding always runs in float32."""

    def __init__(self, tokenizer: Any, lm_head: torch.Tensor, embeddings: torch.Tensor) -> None:
        self.tokenizer = tokenizer
        self.lm_head = lm_head.detach()
        self.embeddings = embeddings.detach()
        self._embedding_norms = self.embeddings.float().norm(dim=-1).clamp_min(1e-12)
        #: The tokenizer's special tokens (end of text, chat markers) that are rows of the vocabulary.
        rows = min(self.lm_head.shape[0], self.embeddings.shape[0])
        special = sorted({int(i) for i in getattr(tokenizer, "all_special_ids", ()) if 0 <= int(i) < rows})
        self.special_ids = torch.tensor(special, dtype=torch.long, device=self.lm_head.device)
        #: Token ids this decoder never names (none unless a request asks: ``for_request``).
        self._excluded: torch.Tensor | None = None

    def for_request(self, options: ExplainOptions) -> TokenDecoder:
        """This decoder as one request's options ask it to decode.

        The one place where a request's decoding options reach the decoder: the explanation and the layer analysis
        decode through the pass's ``decoder`` (``ExplanationPass.decoder``), so a new decoding option is read here
        and nowhere else. ``skip_special_tokens`` excludes the special tokens from every list.
        """
        if not options.skip_special_tokens or self.special_ids.numel() == 0:
            return self
        view = copy.copy(self)  # shares the weights; only the exclusions differ
        view._excluded = self.special_ids
        return view

    def text(self, token_id: int) -> str:
        """The token as text, as the tokenizer would print it (" only", not "Ġonly")."""
        return str(self.tokenizer.decode([int(token_id)]))

    def texts(self, token_ids: list[int]) -> tuple[str, ...]:
        return tuple(self.text(t) for t in token_ids)

    def _top(self, scores: torch.Tensor, count: int) -> list[tuple[TokenScore, ...]]:
        if self._excluded is not None:
            scores = scores.index_fill(0, self._excluded.to(scores.device), float("-inf"))
            count = min(count, scores.shape[0] - self._excluded.numel())
        values, indices = torch.topk(scores, k=min(count, scores.shape[0]), dim=0)
        return [
            tuple(
                TokenScore(token_id=int(i), text=self.text(int(i)), score=float(v))
                for v, i in zip(values[:, column], indices[:, column], strict=True)
            )
            for column in range(scores.shape[1])
        ]

    def output_tokens(self, vectors: torch.Tensor, count: int) -> list[tuple[TokenScore, ...]]:
        """For each column of ``vectors`` (d, m): the ``count`` tokens with the largest logit W v."""
        return self._top(self.lm_head.float() @ vectors.float(), count)

    def input_tokens(self, vectors: torch.Tensor, count: int) -> list[tuple[TokenScore, ...]]:
        """For each column of ``vectors`` (d, m): the ``count`` input embeddings nearest by cosine similarity."""
        columns = vectors.float() / vectors.float().norm(dim=0, keepdim=True).clamp_min(1e-12)
        cosines = (self.embeddings.float() @ columns) / self._embedding_norms[:, None]
        return self._top(cosines, count)
