"""A tiny character-level transformer language model, and the text it learns.

The model is GPT-2's layout at toy size (Radford et al. 2019; Karpathy's nanoGPT): token
and position embeddings, pre-norm blocks of causal self-attention and an MLP on a
residual stream, a final LayerNorm and a linear head that gives one logit per character.
The text, ``data/numbers.txt``, ships with ``finite``: a short essay on floating-point
numbers in training, so the lab needs no download.

References
----------
A. Radford, J. Wu, R. Child, D. Luan, D. Amodei, I. Sutskever, "Language Models are
Unsupervised Multitask Learners", 2019.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from finite.lab._training import seeded

__all__ = ["TEXT_NAME", "TinyLM", "encode", "text", "text_batches", "tokens", "vocabulary"]

#: The file, in ``finite/lab/data/``, the lab's language model is trained on.
TEXT_NAME = "numbers.txt"


@functools.cache
def text() -> str:
    """The shipped training text (UTF-8), read with :mod:`importlib.resources`."""
    return (resources.files("finite.lab") / "data" / TEXT_NAME).read_text(encoding="utf-8")


@functools.cache
def vocabulary() -> str:
    """The distinct characters of :func:`text`, sorted: character ``i`` is token ``i``."""
    return "".join(sorted(set(text())))


def encode(string: str) -> torch.Tensor:
    """Token ids (int64) of ``string``; every character must be in :func:`vocabulary`."""
    index = {c: i for i, c in enumerate(vocabulary())}
    return torch.tensor([index[c] for c in string], dtype=torch.int64)


@functools.cache
def tokens() -> torch.Tensor:
    """The whole text as token ids."""
    return encode(text())


def text_batches(batch: int, context: int) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """``batches(i)`` -> ``(inputs, targets)``, each ``(batch, context)`` token ids.

    Batch ``i`` is ``batch`` windows of the text at offsets drawn from a generator seeded
    with ``i`` (reproducible on its own); the targets are the inputs shifted by one
    character: every position predicts the next.
    """
    offsets = torch.arange(context + 1)

    def batches(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tokens()
        starts = torch.randint(0, len(ids) - context, (batch, 1), generator=seeded(i))
        windows = ids[starts + offsets]
        return windows[:, :-1], windows[:, 1:]

    return batches


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attention(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln_1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        # Scores are divided by sqrt(d / n_heads) and each position sees only the past.
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln_2(x))


class TinyLM(nn.Module):
    """A character-level GPT: ``logits = head(ln_f(blocks(embed(tokens) + pos)))``.

    Weights start as in GPT-2: normal with standard deviation 0.02, biases zero, the
    LayerNorms at identity.

    Parameters
    ----------
    vocab_size : int
        Number of distinct tokens.
    context : int
        Longest sequence (positions with an embedding).
    d_model, n_heads, n_layers : int
        Width of the residual stream, attention heads per block, blocks.
    """

    def __init__(
        self, vocab_size: int, context: int, d_model: int = 32, n_heads: int = 4, n_layers: int = 1
    ) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
