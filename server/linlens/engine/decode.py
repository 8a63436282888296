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
        #: Whether the head and the input embeddings are one matrix (tied weights, no logit multiplier): then one
        #: read of it scores the output and the input readings together.
        self.tied = (
            self.lm_head.shape == self.embeddings.shape
            and self.lm_head.dtype == self.embeddings.dtype
            and self.lm_head.device == self.embeddings.device
            and self.lm_head.stride() == self.embeddings.stride()
            and self.lm_head.data_ptr() == self.embeddings.data_ptr()
        )
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
        """The ``count`` best tokens of each row of ``scores`` (m, vocabulary)."""
        if self._excluded is not None:
            scores = scores.index_fill(1, self._excluded.to(scores.device), float("-inf"))
            count = min(count, scores.shape[1] - self._excluded.numel())
        values, indices = torch.topk(scores, k=min(count, scores.shape[1]), dim=1)
        ids, numbers = indices.tolist(), values.tolist()
        return [
            tuple(TokenScore(token_id=i, text=self.text(i), score=v) for v, i in zip(row_values, row_ids, strict=True))
            for row_values, row_ids in zip(numbers, ids, strict=True)
        ]

    @staticmethod
    def _scores(matrix: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """(m, vocabulary): each column of ``vectors`` (d, m) against every row of ``matrix``, in float32.

        As ``linear`` of the rows, not ``matrix @ vectors``: for a few columns the latter takes a slower kernel
        (SmolLM2's 49,152 x 576 head against 6 vectors, one thread: 15 ms against 26)."""
        return torch.nn.functional.linear(vectors.float().T.contiguous(), matrix.float())

    def _cosine_columns(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors.float() / vectors.float().norm(dim=0, keepdim=True).clamp_min(1e-12)

    def output_tokens(self, vectors: torch.Tensor, count: int) -> list[tuple[TokenScore, ...]]:
        """For each column of ``vectors`` (d, m): the ``count`` tokens with the largest logit W v."""
        return self._top(self._scores(self.lm_head, vectors), count)

    def input_tokens(self, vectors: torch.Tensor, count: int) -> list[tuple[TokenScore, ...]]:
        """For each column of ``vectors`` (d, m): the ``count`` input embeddings nearest by cosine similarity."""
        cosines = self._scores(self.embeddings, self._cosine_columns(vectors)) / self._embedding_norms[None]
        return self._top(cosines, count)

    def both_tokens(
        self, outputs: torch.Tensor, inputs: torch.Tensor, count: int
    ) -> tuple[list[tuple[TokenScore, ...]], list[tuple[TokenScore, ...]]]:
        """:meth:`output_tokens` of ``outputs`` and :meth:`input_tokens` of ``inputs`` (each (d, m)).

        Where the head and the embeddings are one matrix, one read of it scores both: reading a vocabulary x d
        matrix is what decoding costs (SmolLM2, one thread: ~15 ms a read, for 3 columns or 6)."""
        if not self.tied:
            return self.output_tokens(outputs, count), self.input_tokens(inputs, count)
        m = outputs.shape[1]
        scores = self._scores(self.lm_head, torch.cat([outputs.float(), self._cosine_columns(inputs)], dim=1))
        cosines = scores[m:] / self._embedding_norms[None]
        return self._top(scores[:m], count), self._top(cosines, count)
